"""Label a CSV of comments: category, triples and error columns appended, streamed and resumable.

    python -m model.label --model runs/demo/merged --input in.csv --output out.csv [--column comment]

The core is `label_csv(cfg, predict_fn)`: it knows nothing about models, so the streaming, encoding,
spreadsheet-safety and resume logic is tested with a fast fake predictor; `main()` wires in
`model.load.load_merged` + `model.predict.predict`.

Resume protocol (an interrupted run, killed at any point, continues without relabelling finished rows
and ends byte-identical to an uninterrupted run):
  - rows are labelled in chunks of --chunk-rows and appended to `OUT.partial`;
  - after each chunk the partial file is fsynced, then `OUT.progress.json` is replaced atomically with
    the input's fingerprint (size + sha256), the settings, rows done and the partial file's size;
  - a rerun whose input and settings match truncates the partial file to the recorded size (dropping
    a half-written chunk), skips the rows done and goes on; anything else starts over, saying why;
  - at the end the partial file is renamed to OUT, so OUT is never half-written;
  - the whole run holds OUT.lock (core.safe_io.OutputLock), so no other run appends to OUT.partial.
Chunks are the same with or without an interruption (resume starts on a chunk boundary), so even a
model whose answers depend on batch composition gives identical bytes.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Protocol

from core.config import parse_config
from core.dataset import TASKS
from core.safe_io import OutputError, OutputLock, atomic_write_json, check_writable, fsync_dir, refuse_overlap
from model.prompts import is_blank

# Header names (lower case) that hold the text to label, most specific first.
TEXT_COLUMN_NAMES = ("comment", "text", "review", "content", "sentence", "评论", "内容", "文本", "句子")
OUTPUT_COLUMNS = ("category", "category_confidence", "triples", "error", "warnings")
EMPTY_TEXT = "empty text"  # the same message model.predict gives, so both paths read alike
# Cells starting with these are formulas (or become one) in Excel/LibreOffice: OWASP "CSV injection".
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
GB_ENCODINGS = {"gb2312", "gbk", "gb18030", "hz"}
DETECT_SAMPLE_BYTES = 1 << 20  # charset-normalizer sees this much; the whole file is then decoded strictly
READ_BLOCK_BYTES = 1 << 20
PROGRESS_FORMAT = 2  # 2: the category_confidence column and --min-confidence
# A long review is far below this; the csv module's default (128 KiB) would crash on a pasted article.
csv.field_size_limit(64 << 20)

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
"""


class LabelError(ValueError):
    """A problem with the input, the output path or the options, worded for the user."""


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


@dataclass(frozen=True)
class Source:
    """An input file checked to be text: how to decode it and a fingerprint to recognise it on resume."""

    path: Path
    encoding: str
    size: int
    sha256: str
    line_count: int  # newlines: an estimate of the row count for the progress bar


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


# ---------------------------------------------------------------- reading


def _is_gb(encoding: str) -> bool:
    try:
        return codecs.lookup(encoding).name in GB_ENCODINGS
    except LookupError:
        return False


def _fingerprint(path: Path) -> tuple[str, int]:
    """(sha256, newline count) of the file, read in blocks so memory stays flat for any size."""
    digest, newlines = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while block := handle.read(READ_BLOCK_BYTES):
            digest.update(block)
            newlines += block.count(b"\n")
    return digest.hexdigest(), newlines


def _decodes(path: Path, encoding: str) -> bool:
    """Whether the whole file decodes strictly, so no row can fail to decode halfway through a run."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    try:
        with path.open("rb") as handle:
            while block := handle.read(READ_BLOCK_BYTES):
                decoder.decode(block)
        decoder.decode(b"", final=True)  # a multi-byte character cut off at the end
    except UnicodeDecodeError:
        return False
    return True


def guess_encoding(sample: bytes) -> str | None:
    """charset-normalizer's guess for non-UTF-8 bytes; any GB candidate wins as gb18030 (the GBK superset),
    because short GBK comments are sometimes ranked as Korean cp949 first."""
    import charset_normalizer

    matches = charset_normalizer.from_bytes(sample)
    for match in matches:
        if any(_is_gb(name) for name in [match.encoding, *match.could_be_from_charset]):
            return "gb18030"
    best = matches.best()
    return best.encoding if best else None


def _looks_binary(sample: bytes) -> bool:
    """NUL bytes or many control characters: not a CSV (UTF-16 too, which we ask users to re-save)."""
    if b"\x00" in sample:
        return True
    controls = sum(1 for b in sample if b < 32 and b not in (9, 10, 13))
    return controls > max(2, len(sample) // 100)


def inspect_input(path: str | Path) -> Source:
    """Check that `path` is a readable text file and find its encoding from its bytes (never its name)."""
    path = Path(path)
    if not path.exists():
        raise LabelError(f"input file not found: {path}")
    if not path.is_file():
        raise LabelError(f"input is not a file: {path}")
    with path.open("rb") as handle:
        sample = handle.read(DETECT_SAMPLE_BYTES)
    size = path.stat().st_size
    if size == 0:
        raise LabelError(f"{path} is empty: expected a CSV with a header row and at least one row")
    if _looks_binary(sample):
        raise LabelError(f"{path} is not a text CSV (binary data or UTF-16); save it as CSV in UTF-8 or GBK")
    # UTF-8 (BOM or not) first and strictly: charset-normalizer can rank valid UTF-8 Chinese as something else.
    encoding = "utf-8-sig" if _decodes(path, "utf-8-sig") else guess_encoding(sample)
    if encoding is None:
        raise LabelError(f"{path}: cannot tell its text encoding; save it as CSV in UTF-8 or GBK")
    if encoding != "utf-8-sig" and not _decodes(path, encoding):
        raise LabelError(f"{path} is neither UTF-8 nor valid {encoding}; save it as CSV in UTF-8 or GBK")
    sha, lines = _fingerprint(path)
    return Source(path, encoding, size, sha, lines)


def _records(handle) -> Iterator[list[str]]:
    """CSV records, blank lines skipped (they are not rows, as in pandas and Excel)."""
    for record in csv.reader(handle):
        if record:
            yield record


def prepare(cfg: LabelConfig, source: Source | None = None) -> tuple[Source, list[str], int]:
    """(input source, header, text column index), or a LabelError saying what is wrong, before any labelling."""
    source = source or inspect_input(cfg.input)
    header, has_rows = read_header(source)
    if not has_rows:
        raise LabelError(f"{source.path} has a header but no rows to label")
    if Path(cfg.output).is_dir():
        raise LabelError(f"--output {cfg.output} is a directory; give a file name such as labelled.csv")
    try:  # before the model loads: the output roughly takes the input's size plus the new columns
        check_writable(Path(cfg.output).parent, need_bytes=2 * source.size + (1 << 20))
    except OutputError as err:
        raise LabelError(str(err)) from None
    return source, header, pick_text_column(header, cfg.column, source.path)


def read_header(source: Source) -> tuple[list[str], bool]:
    """(header names exactly as written, whether any data row follows)."""
    with source.path.open(encoding=source.encoding, newline="") as handle:
        records = _records(handle)
        header = next(records, None)
        if header is None:
            raise LabelError(f"{source.path} has no header row (only blank lines)")
        return header, next(records, None) is not None


def pick_text_column(header: Sequence[str], column: str | None, path: Path | str) -> int:
    """Index of the text column: --column (exact, then any case), else the first known name."""
    folded = [name.strip().casefold() for name in header]
    if column is not None:
        for candidates in ([name.strip() for name in header], folded):
            wanted = column.strip() if candidates is not folded else column.strip().casefold()
            if wanted in candidates:
                return candidates.index(wanted)
        raise LabelError(f"{path} has no column {column!r}; columns found: {list(header)}")
    for name in TEXT_COLUMN_NAMES:
        if name in folded:
            return folded.index(name)
    raise LabelError(
        f"{path}: no text column found; columns found: {list(header)}. "
        f"Name it one of {', '.join(TEXT_COLUMN_NAMES)} or pass --column NAME"
    )


def fit_row(record: list[str], width: int) -> tuple[list[str], str | None]:
    """A record made as wide as the header, so every input row gives exactly one aligned output row.

    Short rows are padded. Long ones usually come from an unquoted comma in the last field, so the
    extra fields are joined back into it (nothing is dropped) and the row gets a warning."""
    if len(record) <= width:
        return record + [""] * (width - len(record)), None
    joined = record[: width - 1] + [",".join(record[width - 1 :])]
    return joined, f"row has {len(record)} fields, the header {width}: the extra ones were joined into the last column"


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


# ---------------------------------------------------------------- writing


def neutralise(cell: str) -> str:
    """Prefix a formula-like cell with a single quote (OWASP CSV injection); plain numbers such as -5 stay."""
    if cell.startswith(FORMULA_PREFIXES) and not _NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def output_header(header: Sequence[str]) -> list[str]:
    """The input header plus the labeller's columns; a name already taken gets _2, _3 ... (never overwritten)."""
    taken = {name.strip().casefold() for name in header}
    added = []
    for name in OUTPUT_COLUMNS:
        candidate, n = name, 1
        while candidate.casefold() in taken:
            n += 1
            candidate = f"{name}_{n}"
        taken.add(candidate.casefold())
        added.append(candidate)
    return list(header) + added


def render_rows(rows: Sequence[Sequence[str]]) -> bytes:
    """CSV bytes (UTF-8, CRLF as RFC 4180 and Excel expect), every cell neutralised."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerows([[neutralise(cell) for cell in row] for row in rows])
    # Input was decoded strictly and answers are decoded tokens, so nothing here is unencodable;
    # "replace" only guarantees a stray surrogate can never abort a run.
    return buffer.getvalue().encode("utf-8", errors="replace")


# ---------------------------------------------------------------- resume


def partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def progress_path(output: Path) -> Path:
    return output.with_name(output.name + ".progress.json")


def run_key(cfg: LabelConfig, source: Source, column: str) -> dict:
    """Everything that decides the output bytes: if any of it changed, finished rows cannot be reused."""
    return {
        "input": str(source.path.resolve()),
        "input_size": source.size,
        "input_sha256": source.sha256,
        "encoding": source.encoding,
        "column": column,
        "tasks": list(cfg.task_list),
        "chunk_rows": cfg.chunk_rows,
        "batch_size": cfg.batch_size,
        "min_confidence": cfg.min_confidence,
        "model": str(Path(cfg.model).resolve()),
        "model_files": _model_stamp(Path(cfg.model)),
    }


def _model_stamp(folder: Path) -> list:
    """Name, size and mtime of the weights and schema: a model retrained in place must not resume."""
    if not folder.is_dir():
        return []
    files = [*folder.glob("*.safetensors"), *folder.glob("*.bin"), folder / "schema.json"]
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file())


def resume_point(output: Path, key: dict, log: Callable[[str], None]) -> tuple[int, int, int]:
    """(rows done, of them with an error, partial bytes) to continue from, or zeros after saying why not."""
    progress, partial = progress_path(output), partial_path(output)
    if not progress.exists():
        return 0, 0, 0
    try:
        state = json.loads(progress.read_text(encoding="utf-8"))
        rows, errors, offset = int(state["rows_done"]), int(state["error_rows"]), int(state["partial_bytes"])
        saved = state["key"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        log(f"starting over: {progress} is unreadable ({err})")
        return 0, 0, 0
    if state.get("format") != PROGRESS_FORMAT:
        log(f"starting over: {progress} was written by another version")
        return 0, 0, 0
    changed = sorted(name for name in set(saved) | set(key) if saved.get(name) != key.get(name))
    if changed:
        what = "the input file changed" if any(n.startswith("input") for n in changed) else "settings changed"
        log(f"starting over: {what} since the interrupted run ({', '.join(changed)})")
        return 0, 0, 0
    if not partial.exists() or partial.stat().st_size < offset:
        log(f"starting over: {partial} is missing or shorter than recorded")
        return 0, 0, 0
    return rows, errors, offset


def _save_progress(output: Path, key: dict, rows: int, errors: int, offset: int) -> None:
    state = {"format": PROGRESS_FORMAT, "key": key, "rows_done": rows, "error_rows": errors, "partial_bytes": offset}
    atomic_write_json(progress_path(output), state, indent=1)


# ---------------------------------------------------------------- the run


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _chunks(source: Source, width: int, size: int, skip: int) -> Iterator[list[tuple[list[str], str | None]]]:
    """Lists of (row fitted to the header, warning) of `size` rows, after the header and `skip` rows."""
    with source.path.open(encoding=source.encoding, newline="") as handle:
        records = _records(handle)
        next(records)  # the header
        for _ in islice(records, skip):
            pass
        while chunk := list(islice(records, size)):
            yield [fit_row(record, width) for record in chunk]


def _chunk_rows(fitted: list[tuple[list[str], str | None]], labels: list[RowLabel]) -> list[list]:
    rows = []
    for (cells, row_warning), label in zip(fitted, labels, strict=True):
        warnings = "; ".join(w for w in (row_warning, label.warnings) if w)
        rows.append([*cells, label.category, label.category_confidence, label.triples, label.error, warnings])
    return rows


def label_csv(
    cfg: LabelConfig,
    predict_fn: PredictFn,
    source: Source | None = None,
    log: Callable[[str], None] = _log_stderr,
    on_progress: Callable[[int, int], None] | None = None,
    show_bar: bool = True,
    take_lock: bool = True,
) -> LabelResult:
    """Label cfg.input into cfg.output with predict_fn(texts) -> predictions, resuming an interrupted run.

    `source` skips re-inspecting an input already checked (main checks it before loading the model);
    `on_progress(rows_done, estimated_total)` is for callers without a terminal (the Streamlit page).
    The output is locked for the run (OUT.lock) unless the caller holds the lock (take_lock=False)."""
    if not take_lock:
        return _label_csv(cfg, predict_fn, source, log, on_progress, show_bar)
    try:
        with OutputLock(cfg.output, "model.label"):
            return _label_csv(cfg, predict_fn, source, log, on_progress, show_bar)
    except OutputError as err:
        raise LabelError(str(err)) from None


def _label_csv(cfg, predict_fn, source, log, on_progress, show_bar) -> LabelResult:
    from tqdm import tqdm

    started = time.time()
    source, header, text_index = prepare(cfg, source)
    column = header[text_index]
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
            handle.write(codecs.BOM_UTF8 + render_rows([output_header(header)]))
        for fitted in _chunks(source, len(header), cfg.chunk_rows, skip=done):
            labels = label_texts([cells[text_index] for cells, _ in fitted], predict_fn, cfg.task_list, log,
                                 cfg.min_confidence)
            error_rows += sum(1 for label in labels if label.error)
            handle.write(render_rows(_chunk_rows(fitted, labels)))
            handle.flush()
            os.fsync(handle.fileno())  # the progress file must never point past bytes that are on disk
            done += len(fitted)
            _save_progress(output, key, done, error_rows, handle.tell())
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


def main(argv: list[str] | None = None, predict_fn: PredictFn | None = None) -> LabelResult:
    """CLI entry. `predict_fn` replaces the model (tests, embedding); then --model is not loaded."""
    from model.load import ModelLoadError

    try:
        cfg = parse_config(LabelConfig, argv, DESCRIPTION)
        _log_stderr(f"config: {json.dumps(dataclasses.asdict(cfg), ensure_ascii=False)}")
        # Check the input before the (slow) model load, so a wrong file fails in a second.
        source, _, _ = prepare(cfg)
        # Locked before the model loads, so a second run on the same output is refused in a second.
        with OutputLock(cfg.output, "model.label"):
            return label_csv(cfg, predict_fn or model_predictor(cfg), source=source, take_lock=False)
    except (LabelError, OutputError, ModelLoadError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
