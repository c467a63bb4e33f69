"""Label a CSV of comments: category, triples and error columns appended, streamed and resumable.

    python -m model.label --model runs/demo/merged --input in.csv --output out.csv [--column comment]

The core is `label_csv(cfg, predict_fn)`: it knows nothing about models, so the streaming, encoding,
spreadsheet-safety and resume logic is tested with a fast fake predictor; `main()` wires in
`model.load.load_merged` + `model.predict.predict`. Reading and writing the CSV files is model.csv_file
(shared with the app's batch page); the resume protocol is model.resume. The whole run holds OUT.lock
(core.safe_io.OutputLock), so no other run appends to OUT.partial, and OUT appears only when the run is
complete (OUT.partial renamed). Chunks are the same with or without an interruption (resume starts on a
chunk boundary), so even a model whose answers depend on batch composition gives identical bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from core.config import parse_config
from core.dataset import TASKS
from core.safe_io import OutputError, OutputLock, check_writable, fsync_dir, refuse_overlap
from model.csv_file import (
    CheckedInput,
    LabelError,
    check_input,
    header_bytes,
    inspect_input,
    read_chunks,
    render_rows,
)
from model.prompts import is_blank
from model.resume import partial_path, progress_path, resume_point, run_key, save_progress

EMPTY_TEXT = "empty text"  # the same message model.predict gives, so both paths read alike
DESCRIPTION = """Label a CSV of short Chinese comments with a merged LoRA model.

Appends the columns category, category_confidence, triples (a JSON list of {predicate, object_type,
subject_type, object, subject, confidence}), error (empty when the row is fine; "empty text" for an empty
comment) and warnings (e.g. a text cut to the model's length limit). All original columns and the row
order are kept. Confidence (0-1) is the model's own probability of its answer under the constraint
(model.confidence); --min-confidence X drops the triples below X (the category is always given).

Input: UTF-8, UTF-8 with BOM or GBK/GB18030, detected from the bytes. The text column is the one named
comment/text/review/content/sentence/评论/内容/文本/句子 (any case), or --column.
Output: UTF-8 with a BOM, so Excel opens the Chinese text correctly. Spreadsheet safety: every cell that
starts with = + - @ or a tab/CR (and is not a plain number) gets a leading single quote, so Excel does not
run it as a formula (OWASP "CSV injection").
Resume: the run writes OUT.partial and OUT.progress.json after every chunk; rerun the same command after
an interruption and it continues where it stopped. OUT appears only when the run is complete.
One run per output: OUT.lock is held while it runs, and a second run on the same OUT is refused.
Many files or many model copies: --engine ray (a file, folder or glob of CSVs into a folder of block CSVs,
on Ray Data; python -m model.label --engine ray --help); --engine ray-vllm: the same with vLLM in each actor.
"""


class PredictionLike(Protocol):
    """What label_csv reads from a prediction (model.predict.Prediction has it)."""

    category: str | None
    triples: Sequence
    warnings: list[str]
    error: str | None
    # category_confidence (float or None) and each triple's confidence are read when present.


PredictFn = Callable[[list[str]], Sequence[PredictionLike]]


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class LabelConfig:
    model: str = field(metadata=_help("merged model directory (finetune.merge output, with schema.json)"))
    input: str = field(metadata=_help("CSV to label (UTF-8, UTF-8 with BOM or GBK)"))
    output: str = field(metadata=_help("labelled CSV to write (UTF-8 with BOM); OUT.partial while running"))
    column: str | None = field(default=None, metadata=_help("text column (default: found by its name)"))
    batch_size: int = field(default=8, metadata=_help("texts per generate() call (default 8)"))
    chunk_rows: int = field(
        default=256, metadata=_help("rows read, labelled and saved at a time: the resume unit (default 256)")
    )
    tasks: str = field(
        default="classification,extraction",
        metadata=_help("comma-separated: classification (category), extraction (triples); default both. "
                       "A task not run leaves its column empty"),
    )
    device: str | None = field(default=None, metadata=_help("cpu, cuda, cuda:N (default: cuda if available)"))
    min_confidence: float = field(
        default=0.0, metadata=_help("drop triples whose confidence is below this (0-1; default 0: keep all)")
    )

    def __post_init__(self) -> None:
        problems = []
        if not self.min_confidence >= 0:  # also NaN
            problems.append(f"--min-confidence must be a number >= 0, got {self.min_confidence}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.chunk_rows < 1:
            problems.append(f"--chunk-rows must be >= 1, got {self.chunk_rows}")
        wanted = [t.strip() for t in self.tasks.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in TASKS]
        if unknown or not wanted:
            problems.append(f"--tasks must be a comma-separated subset of {','.join(TASKS)}, got {self.tasks!r}")
        try:  # the output and its side files (OUT.partial, OUT.progress.json, OUT.lock) are all written
            refuse_overlap({"--output": self.output}, {"--input": self.input})
        except OutputError as err:
            problems.append(str(err))
        if problems:
            raise LabelError("; ".join(problems))

    @property
    def task_list(self) -> tuple[str, ...]:
        """The requested tasks in canonical order, so 'extraction,classification' resumes 'classification,...'."""
        wanted = {t.strip() for t in self.tasks.split(",")}
        return tuple(t for t in TASKS if t in wanted)


@dataclass
class LabelResult:
    output: Path
    rows: int
    error_rows: int
    resumed_rows: int
    encoding: str
    column: str
    seconds: float


@dataclass(frozen=True)
class RowLabel:
    category: str = ""
    category_confidence: str = ""
    triples: str = ""
    error: str = ""
    warnings: str = ""


# ---------------------------------------------------------------- labelling


def _confidence_cell(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def kept_triples(triples: Sequence, min_confidence: float) -> list:
    """The triples at or above min_confidence; one without a confidence (unconstrained) is kept only at 0."""
    if min_confidence <= 0:
        return list(triples)
    return [t for t in triples if getattr(t, "confidence", None) is not None and t.confidence >= min_confidence]


def _triple_cell(triple) -> dict:
    return triple.to_output() if hasattr(triple, "to_output") else triple.to_dict()


def _row_label(pred: PredictionLike, tasks: Sequence[str], min_confidence: float = 0.0) -> RowLabel:
    warnings = "; ".join(pred.warnings or [])
    if pred.error:
        return RowLabel(error=str(pred.error), warnings=warnings)
    # A task that was not asked for stays blank: "[]" would claim the model found no triples.
    category, category_confidence = "", ""
    if "classification" in tasks:
        category = pred.category or ""
        category_confidence = _confidence_cell(getattr(pred, "category_confidence", None) if category else None)
    triples = ""
    if "extraction" in tasks:
        kept = kept_triples(pred.triples, min_confidence)
        triples = json.dumps([_triple_cell(t) for t in kept], ensure_ascii=False)
    return RowLabel(category, category_confidence, triples, "", warnings)


def _failed(err: BaseException) -> RowLabel:
    return RowLabel(error=f"prediction failed: {type(err).__name__}: {err}")


def _predict_checked(
    predict_fn: PredictFn, texts: list[str], tasks: Sequence[str], min_confidence: float
) -> list[RowLabel]:
    preds = list(predict_fn(texts))
    if len(preds) != len(texts):
        raise RuntimeError(f"predictor returned {len(preds)} predictions for {len(texts)} texts")
    return [_row_label(p, tasks, min_confidence) for p in preds]


def label_texts(
    texts: Sequence[str],
    predict_fn: PredictFn,
    tasks: Sequence[str],
    log: Callable[[str], None] = print,
    min_confidence: float = 0.0,
) -> list[RowLabel]:
    """One RowLabel per text, never raising: empty texts are errors without a model call, and a chunk
    whose prediction raises is retried text by text so only the failing rows carry an error."""
    labels = [RowLabel(error=EMPTY_TEXT) for _ in texts]
    todo = [i for i, text in enumerate(texts) if not is_blank(text)]
    if not todo:
        return labels
    try:
        labelled = _predict_checked(predict_fn, [texts[i] for i in todo], tasks, min_confidence)
        for i, label in zip(todo, labelled, strict=True):
            labels[i] = label
        return labels
    except Exception as err:  # noqa: BLE001 - any failure (OOM, decoding bug) must not stop the run
        log(f"a chunk of {len(todo)} texts failed ({type(err).__name__}: {err}); retrying one text at a time")
    for i in todo:
        try:
            labels[i] = _predict_checked(predict_fn, [texts[i]], tasks, min_confidence)[0]
        except Exception as err:  # noqa: BLE001 - the row gets the error, the run goes on
            labels[i] = _failed(err)
    return labels


# ---------------------------------------------------------------- the run


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def label_chunk(fitted: list[tuple[list[str], str | None]], text_index: int, predict_fn: PredictFn, cfg: LabelConfig,
                log: Callable[[str], None]) -> tuple[bytes, int]:
    """A chunk of rows labelled and rendered as output CSV bytes, and how many of its rows carry an error.
    The one step both engines take per chunk (this CLI and model.label_ray's blocks), so their bytes agree."""
    labels = label_texts([cells[text_index] for cells, _ in fitted], predict_fn, cfg.task_list, log,
                         cfg.min_confidence)
    return render_rows(output_rows(fitted, labels)), sum(1 for label in labels if label.error)


def output_rows(fitted: list[tuple[list[str], str | None]], labels: list[RowLabel]) -> list[list]:
    """Output rows: the input cells, then the labeller's columns (the row's own warning joined to the model's)."""
    rows = []
    for (cells, row_warning), label in zip(fitted, labels, strict=True):
        warnings = "; ".join(w for w in (row_warning, label.warnings) if w)
        rows.append([*cells, label.category, label.category_confidence, label.triples, label.error, warnings])
    return rows


def prepare(cfg: LabelConfig, checked: CheckedInput | None = None) -> CheckedInput:
    """The input checked (inspected once, header, text column) and the output path checked, or a LabelError saying
    what is wrong, before any labelling. `checked`: an input already inspected (the app checks an upload once)."""
    checked = checked or check_input(inspect_input(cfg.input), cfg.column)
    if Path(cfg.output).is_dir():
        raise LabelError(f"--output {cfg.output} is a directory; give a file name such as labelled.csv")
    try:  # before the model loads: the output roughly takes the input's size plus the new columns
        check_writable(Path(cfg.output).parent, need_bytes=2 * checked.source.size + (1 << 20))
    except OutputError as err:
        raise LabelError(str(err)) from None
    return checked


def label_csv(
    cfg: LabelConfig,
    predict_fn: PredictFn,
    checked: CheckedInput | None = None,
    log: Callable[[str], None] = _log_stderr,
    on_progress: Callable[[int, int], None] | None = None,
    show_bar: bool = True,
    take_lock: bool = True,
) -> LabelResult:
    """Label cfg.input into cfg.output with predict_fn(texts) -> predictions, resuming an interrupted run.

    `checked`: the input as `prepare` checked it (main checks it before loading the model, the app when the file
    is uploaded), so it is not inspected again;
    `on_progress(rows_done, estimated_total)` is for callers without a terminal (the Streamlit page).
    The output is locked for the run (OUT.lock) unless the caller holds the lock (take_lock=False)."""
    if not take_lock:
        return _label_csv(cfg, predict_fn, checked, log, on_progress, show_bar)
    try:
        with OutputLock(cfg.output, "model.label"):
            return _label_csv(cfg, predict_fn, checked, log, on_progress, show_bar)
    except OutputError as err:
        raise LabelError(str(err)) from None


def _label_csv(cfg, predict_fn, checked, log, on_progress, show_bar) -> LabelResult:
    from tqdm import tqdm

    started = time.time()
    checked = prepare(cfg, checked)  # an input checked already is not read again; the output is checked here
    source, header, text_index, column = checked.source, checked.header, checked.text_index, checked.column
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    key = run_key(cfg, source, column)
    done, error_rows, offset = resume_point(output, key, log)
    resumed = done
    estimate = max(done, source.line_count - 1)
    log(f"labelling {source.path} ({source.encoding}, about {estimate:,} rows, text column {column!r}, "
        f"tasks {','.join(cfg.task_list)}) -> {output}" + (f"; resuming after {done:,} rows" if done else ""))
    partial = partial_path(output)
    if not done:
        # A stale progress file must never be matched against a partial file this run rewrites.
        progress_path(output).unlink(missing_ok=True)
    with partial.open("r+b" if done else "wb") as handle, tqdm(
        total=estimate, initial=done, unit="rows", desc="labelling", disable=not show_bar, file=sys.stderr
    ) as bar:
        if done:
            handle.truncate(offset)  # drops whatever a killed run wrote after its last complete chunk
            handle.seek(offset)
        else:
            handle.write(header_bytes(header))
        for fitted in read_chunks(source, len(header), cfg.chunk_rows, skip=done):
            data, errors = label_chunk(fitted, text_index, predict_fn, cfg, log)
            error_rows += errors
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # the progress file must never point past bytes that are on disk
            done += len(fitted)
            save_progress(output, key, done, error_rows, handle.tell())
            bar.update(len(fitted))
            if on_progress:
                on_progress(done, max(done, estimate))
        bar.total = done
        bar.refresh()
    os.replace(partial, output)
    fsync_dir(output.parent)
    progress_path(output).unlink(missing_ok=True)
    result = LabelResult(output, done, error_rows, resumed, source.encoding, column, time.time() - started)
    log(f"wrote {output}: {done:,} rows, {error_rows:,} with an error, in {result.seconds:.1f}s")
    return result


# ---------------------------------------------------------------- CLI


def model_predictor(cfg: LabelConfig) -> PredictFn:
    """Load the merged model once and return texts -> predictions (imports torch only here)."""
    from model.load import load_merged
    from model.predict import predict

    lm = load_merged(cfg.model, device=cfg.device)
    return lambda texts: predict(lm, texts, tasks=cfg.task_list, batch_size=cfg.batch_size)


ENGINES = ("local", "ray", "ray-vllm")


def split_engine(argv: list[str]) -> tuple[str, list[str]]:
    """(--engine's value, the other arguments): each engine parses its own options (and --help)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--engine", choices=ENGINES, default="local")
    known, rest = parser.parse_known_args(argv)
    return known.engine, rest


def main(argv: list[str] | None = None, predict_fn: PredictFn | None = None):
    """CLI entry. `predict_fn` replaces the model (tests, embedding); then --model is not loaded.
    --engine ray hands the run to model.label_ray (folders and globs of CSVs on Ray Data)."""
    from model.load import ModelLoadError

    engine, argv = split_engine(sys.argv[1:] if argv is None else argv)
    if engine != "local":
        from model.label_ray import main as ray_main

        return ray_main([*argv, "--engine", engine])
    try:
        cfg = parse_config(LabelConfig, argv, DESCRIPTION)
        _log_stderr(f"config: {json.dumps(dataclasses.asdict(cfg), ensure_ascii=False)}")
        # Check the input before the (slow) model load, so a wrong file fails in a second.
        checked = prepare(cfg)
        # Locked before the model loads, so a second run on the same output is refused in a second.
        with OutputLock(cfg.output, "model.label"):
            return label_csv(cfg, predict_fn or model_predictor(cfg), checked=checked, take_lock=False)
    except (LabelError, OutputError, ModelLoadError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
