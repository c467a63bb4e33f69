"""Label CSV files on Ray Data: a pool of model actors over blocks of rows, one output CSV per block.

    python -m model.label --engine ray --model DIR --input PATH --output DIR [--actors N] [--gpus-per-actor G]

The driver (this process) checks every input and cuts it into blocks of rows (model.csv_file.plan_blocks)
before Ray starts. Ray Data hands the blocks to `--actors` copies of BlockLabeller; each loads the merged
model once and labels its blocks with the single-process CLI's own code (model.label.label_texts in the
same chunks, the same cells and columns), so a block holds byte for byte the rows `python -m model.label`
writes for them. Ray does the scheduling, retries and placement; this module only says what to run.

The output folder:
    NAME.part-00000.csv ...          one per block, UTF-8 with BOM, each with the header; NAME: the input's name
    manifest.json                    written last: the inputs, their blocks in row order, the counts, settings
    .blocks/NAME.part-00000.json     a finished block's check: its key (input, rows, settings) and its sha256
Every file appears by rename (core.safe_io), so a killed run leaves only hidden temporary files; a rerun of
the same command labels only the blocks whose file and check do not agree, and removes the leftovers.
One run per folder: OUT.lock (beside the folder, as the single-process CLI's OUT.lock) is held while it runs.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from core.config import parse_config
from core.safe_io import OutputError, OutputLock, atomic_write, atomic_write_json, check_writable
from model.csv_file import (
    Block,
    CheckedInput,
    LabelError,
    Source,
    check_input,
    header_bytes,
    inspect_input,
    plan_blocks,
    read_block,
)
from model.label import LabelConfig, PredictFn, _help, label_chunk, model_predictor
from model.resume import label_settings

MANIFEST = "manifest.json"
CHECKS = ".blocks"
FORMAT = 1
BLOCK_FILE = re.compile(r".+\.part-\d{5,}\.csv")
TEMPORARY = re.compile(r"\..+\.tmp-\d+-[0-9a-f]+")  # core.safe_io.tmp_path_for's names
PROJECT_ROOT = Path(__file__).resolve().parents[1]
DESCRIPTION = """Label CSV files on Ray Data with a merged LoRA model: --actors copies of the model, each in its own
Ray worker (one per GPU with --gpus-per-actor 1), over blocks of --block-rows rows.

Input: a CSV file, a folder (its *.csv files) or a glob such as 'dumps/2026-*.csv'; each file is read as the
single-process CLI reads it (UTF-8, UTF-8 with BOM or GBK, detected per file; the same text column rule).
Output: a folder with one CSV per block (NAME.part-00000.csv, rows in input order, the same columns and cells
as `python -m model.label` writes) and manifest.json, written when every block is done.
Ray: a local Ray on this machine, or the cluster at --address / $RAY_ADDRESS. On a cluster, --model, the
inputs and --output must be paths that every node can read (a shared filesystem), and this project must be
importable there (the workers get its folder on PYTHONPATH).
Resume: rerun the same command after an interruption; finished blocks are checked and kept.
"""


@dataclass
class RayLabelConfig(LabelConfig):
    input: str = field(metadata=_help("a CSV file, a folder of *.csv files or a glob (quote it)"))
    output: str = field(metadata=_help("folder for the block CSVs and manifest.json (empty, new, or an earlier run's)"))
    actors: int | None = field(
        default=None, metadata=_help("model copies (Ray actors); default: the cluster's GPUs / --gpus-per-actor, "
                                     "or 1 without GPUs")
    )
    gpus_per_actor: float | None = field(
        default=None, metadata=_help("GPUs per actor (default: 1 if the cluster has GPUs, else 0: CPU actors)")
    )
    cpus_per_actor: int = field(default=1, metadata=_help("CPUs per actor, also its torch threads (default 1)"))
    block_rows: int = field(
        default=4096, metadata=_help("rows per block: the unit of work, output file and resume; a multiple of "
                                     "--chunk-rows (default 4096)")
    )
    engine: str = field(
        default="ray", metadata=_help("ray: our decoding in each actor; ray-vllm: vLLM in each actor (GPU, "
                                      "requirements-vllm.txt; model/vllm_engine.py)", choices=["ray", "ray-vllm"])
    )
    address: str | None = field(
        default=None, metadata=_help("Ray cluster to join, e.g. ray://head:10001 or auto (default: $RAY_ADDRESS, "
                                     "else a local Ray started for this run)")
    )

    def __post_init__(self) -> None:
        problems = []
        if self.actors is not None and self.actors < 1:
            problems.append(f"--actors must be >= 1, got {self.actors}")
        if self.gpus_per_actor is not None and not self.gpus_per_actor >= 0:
            problems.append(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        if self.cpus_per_actor < 1:
            problems.append(f"--cpus-per-actor must be >= 1, got {self.cpus_per_actor}")
        if self.block_rows < 1 or self.chunk_rows < 1 or self.block_rows % self.chunk_rows:
            # Equal chunks are what make a block's bytes equal to the single-process CLI's for its rows.
            problems.append(f"--block-rows ({self.block_rows}) must be a multiple of --chunk-rows ({self.chunk_rows})")
        try:
            super().__post_init__()
        except LabelError as err:
            problems.append(str(err))
        if problems:
            raise LabelError("; ".join(problems))


@dataclass(frozen=True)
class BlockTask:
    """One block to label, as plain data (it travels to a Ray worker as JSON)."""

    input: str
    encoding: str
    size: int
    sha256: str
    header: list[str]
    text_index: int
    name: str
    index: int
    first_row: int
    rows: int
    start: int
    key: str

    @property
    def file(self) -> str:
        return f"{self.name}.part-{self.index:05d}.csv"

    @property
    def check_file(self) -> str:
        return f"{CHECKS}/{self.name}.part-{self.index:05d}.json"

    @property
    def block(self) -> Block:
        return Block(self.index, self.first_row, self.rows, self.start)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> BlockTask:
        return cls(**json.loads(text))


@dataclass
class RayLabelResult:
    output: Path
    files: int
    blocks: int
    rows: int
    error_rows: int
    resumed_blocks: int
    seconds: float


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- inputs and the plan


def resolve_inputs(spec: str, out_dir: Path) -> list[Path]:
    """The files --input names: one file, a folder's *.csv files, or a glob's files; sorted, none inside out_dir."""
    if "://" in spec:
        raise LabelError(f"--input {spec}: object-storage URIs are not supported yet; copy the files to a folder "
                         "every Ray node can read (a shared filesystem) and pass that folder")
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".csv"
                       and not p.name.startswith("."))
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    elif path.is_file():
        files = [path]
    else:
        raise LabelError(f"--input {spec}: no such file or folder")
    if not files:
        raise LabelError(f"--input {spec}: no CSV files found (a folder is searched for *.csv files; a glob such "
                         "as 'dumps/*.csv' for any file it matches)")
    inside = [str(f) for f in files if out_dir.resolve() in f.resolve().parents]
    if inside:
        raise LabelError(f"--input {spec} matches files inside --output {out_dir} ({', '.join(inside[:3])}); "
                         "put the inputs elsewhere or choose another --output")
    return files


def output_names(files: list[Path]) -> list[str]:
    """A name per input for its block files: the file's stem, or (where stems repeat) its path below the
    inputs' common folder, with / as __."""
    stems = [f.stem for f in files]
    if len(set(stems)) == len(stems):
        return stems
    common = Path(os.path.commonpath([f.resolve().parent for f in files]))
    return [str(f.resolve().relative_to(common)).replace(os.sep, "__") for f in files]


def plan(cfg: RayLabelConfig, inputs: list[CheckedInput], names: list[str]) -> list[BlockTask]:
    settings = label_settings(cfg)
    tasks = []
    for checked, name in zip(inputs, names, strict=True):
        source = checked.source
        for block in plan_blocks(source, cfg.block_rows):
            identity = {"format": FORMAT, "engine": cfg.engine, "settings": settings, "input_sha256": source.sha256,
                        "size": source.size, "encoding": source.encoding, "header": checked.header,
                        "text_index": checked.text_index, "block": [block.first_row, block.rows, block.start]}
            key = hashlib.sha256(json.dumps(identity, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
            tasks.append(BlockTask(str(source.path.resolve()), source.encoding, source.size, source.sha256,
                                   checked.header, checked.text_index, name, block.index, block.first_row,
                                   block.rows, block.start, key))
    return tasks


# ---------------------------------------------------------------- one block (runs in a Ray worker)


def label_block(out_dir: Path, task: BlockTask, predict_fn: PredictFn, cfg: LabelConfig,
                log: Callable[[str], None] = _log_stderr) -> dict:
    """Label one block into out_dir/task.file, then write its check; returns the check."""
    started = time.time()
    source = Source(Path(task.input), task.encoding, task.size, task.sha256, 0)
    fitted = read_block(source, len(task.header), task.block)
    parts, error_rows = [header_bytes(task.header)], 0
    for at in range(0, len(fitted), cfg.chunk_rows):  # the CLI's chunks: answers cannot depend on the engine
        chunk, errors = label_chunk(fitted[at: at + cfg.chunk_rows], task.text_index, predict_fn, cfg, log)
        parts.append(chunk)
        error_rows += errors
    data = b"".join(parts)
    atomic_write(out_dir / task.file, data)
    check = {"key": task.key, "file": task.file, "first_row": task.first_row, "rows": task.rows,
             "error_rows": error_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
             "started": started, "finished": time.time()}  # when, in seconds since the epoch (bench.label_ray)
    atomic_write_json(out_dir / task.check_file, check)  # after the block: a check never vouches for a missing file
    return check


def finished_check(out_dir: Path, task: BlockTask) -> dict | None:
    """The block's check if its file is there, complete and made by this task's key; else None."""
    try:
        check = json.loads((out_dir / task.check_file).read_text(encoding="utf-8"))
        if check.get("key") != task.key:
            return None
        data = (out_dir / task.file).read_bytes()
    except (OSError, ValueError):
        return None
    return check if hashlib.sha256(data).hexdigest() == check.get("sha256") else None


class BlockLabeller:
    """A Ray actor: loads the merged model once, then labels the blocks Ray Data hands it."""

    def __init__(self, cfg: dict, out_dir: str):
        import torch

        self.cfg = RayLabelConfig(**cfg)
        torch.set_num_threads(self.cfg.cpus_per_actor)
        self.out_dir = Path(out_dir)
        if self.cfg.engine == "ray-vllm":
            from model.vllm_engine import vllm_predictor

            self.predict_fn = vllm_predictor(self.cfg.model, self.cfg.task_list)
        else:
            self.predict_fn = model_predictor(self.cfg)

    def __call__(self, batch: dict) -> dict:
        checks = [label_block(self.out_dir, BlockTask.from_json(str(item)), self.predict_fn, self.cfg)
                  for item in batch["task"]]
        return {"file": [c["file"] for c in checks], "rows": [c["rows"] for c in checks]}


# ---------------------------------------------------------------- Ray


def worker_env(cfg: RayLabelConfig) -> dict:
    """What each worker needs: this project importable, and one thread pool sized to its CPUs."""
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "OMP_NUM_THREADS": str(cfg.cpus_per_actor), "TOKENIZERS_PARALLELISM": "false"}


def resolve_resources(cfg: RayLabelConfig, cluster: dict, blocks: int) -> RayLabelConfig:
    """--gpus-per-actor and --actors filled from the cluster's resources; never more actors than blocks."""
    gpus = cfg.gpus_per_actor
    if cfg.engine == "ray-vllm":
        if not cluster.get("GPU", 0) or gpus == 0:
            raise LabelError(f"--engine ray-vllm needs a GPU per actor; the Ray cluster has {cluster.get('GPU', 0):g} "
                             f"GPU(s){' and --gpus-per-actor is 0' if gpus == 0 else ''}. Use --engine ray on CPUs")
        gpus = 1.0 if gpus is None else gpus
    if gpus is None:
        gpus = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    actors = cfg.actors
    if actors is None:
        actors = max(1, int(cluster.get("GPU", 0) // gpus)) if gpus > 0 else 1
    device = cfg.device or ("cuda" if gpus > 0 else "cpu")  # a CPU actor on a GPU node must not take a GPU
    return dataclasses.replace(cfg, gpus_per_actor=gpus, actors=min(actors, blocks), device=device)


class _QuietConsole(logging.Filter):
    """Ray Data's console lines kept to real warnings: its INFO lines and the object-store sizing advice (for
    datasets of files; ours is a list of block descriptions) go to its log file only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and "object store is configured" not in record.getMessage()


def quiet_ray_data_console() -> None:
    import ray.data  # noqa: F401 - importing it sets up the 'ray.data' logger and its console handler

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":  # the console, not the session's log file
            handler.addFilter(_QuietConsole())


def run_on_ray(cfg: RayLabelConfig, out_dir: Path, todo: list[BlockTask], log: Callable[[str], None],
               show_bar: bool) -> RayLabelConfig:
    """Label the blocks in `todo` on Ray Data; returns the settings it ran with (resources resolved)."""
    import ray
    from tqdm import tqdm

    quiet_ray_data_console()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=cfg.address, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": worker_env(cfg)})
    try:
        cfg = resolve_resources(cfg, ray.cluster_resources(), len(todo))
        log(f"Ray: {cfg.actors} actor(s), {cfg.cpus_per_actor} CPU and {cfg.gpus_per_actor:g} GPU each, "
            f"device {cfg.device}; {len(todo)} block(s) to label")
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # ours counts rows; Ray's would interleave with it
        dataset = ray.data.from_items([{"task": t.to_json()} for t in todo], override_num_blocks=len(todo))
        labelled = dataset.map_batches(
            BlockLabeller, fn_constructor_kwargs={"cfg": dataclasses.asdict(cfg), "out_dir": str(out_dir)},
            batch_size=1, concurrency=cfg.actors, num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor,
        )
        # One row per finished block; Ray Data hands each over about one block late (its pipelining).
        with tqdm(total=sum(t.rows for t in todo), unit="rows", desc="labelling", disable=not show_bar,
                  file=sys.stderr) as bar:
            for row in labelled.iter_rows():
                bar.update(int(row["rows"]))
    except ray.exceptions.RayError as err:
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise LabelError(f"the Ray job stopped: {first_line}. The blocks finished so far are kept; rerun the "
                         "same command to go on") from None
    finally:
        if started_here:
            ray.shutdown()
    return cfg


# ---------------------------------------------------------------- the output folder


def check_output_dir(out_dir: Path) -> None:
    """--output must be a new or empty folder, or one this command wrote (never a folder of other files)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise LabelError(f"--output {out_dir} is a file; --engine ray writes a folder of block CSVs, give a folder")
    if not out_dir.is_dir():
        return
    ours = {MANIFEST, CHECKS}
    foreign = sorted(p.name for p in out_dir.iterdir()
                     if p.name not in ours and not BLOCK_FILE.fullmatch(p.name) and not TEMPORARY.fullmatch(p.name))
    if foreign:
        raise LabelError(f"--output {out_dir} holds files this command did not write ({', '.join(foreign[:5])}); "
                         "choose a new or empty folder, so nothing of yours is overwritten or deleted")


def tidy(out_dir: Path, tasks: list[BlockTask]) -> None:
    """Remove what killed or earlier runs left: temporary files, and blocks and checks not in this plan."""
    keep = {t.file for t in tasks} | {Path(t.check_file).name for t in tasks}
    for folder in (out_dir, out_dir / CHECKS):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            stale = TEMPORARY.fullmatch(path.name) or (path.name not in keep and (
                BLOCK_FILE.fullmatch(path.name) or (folder.name == CHECKS and path.suffix == ".json")))
            if stale and path.is_file():
                path.unlink()


def manifest(cfg: RayLabelConfig, inputs: list[CheckedInput], tasks: list[BlockTask], checks: list[dict],
             seconds: float) -> dict:
    files = []
    for checked in inputs:
        path = str(checked.source.path.resolve())
        blocks = [{k: c[k] for k in ("file", "first_row", "rows", "error_rows", "sha256")}
                  for t, c in zip(tasks, checks, strict=True) if t.input == path]
        files.append({"input": path, "encoding": checked.source.encoding, "sha256": checked.source.sha256,
                      "column": checked.column, "rows": sum(b["rows"] for b in blocks), "blocks": blocks})
    return {"format": FORMAT, "engine": cfg.engine, "complete": True, "settings": label_settings(cfg),
            "block_rows": cfg.block_rows, "rows": sum(c["rows"] for c in checks),
            "error_rows": sum(c["error_rows"] for c in checks), "seconds": round(seconds, 1), "inputs": files}


# ---------------------------------------------------------------- the run


def label_files(cfg: RayLabelConfig, log: Callable[[str], None] = _log_stderr, show_bar: bool = True) -> RayLabelResult:
    """Label every input of cfg into the folder cfg.output on Ray, resuming an interrupted run."""
    from model.load import check_model_dir

    started = time.time()
    out_dir = Path(cfg.output)
    files = resolve_inputs(cfg.input, out_dir)
    check_output_dir(out_dir)
    check_model_dir(Path(cfg.model))
    if cfg.engine == "ray-vllm":
        from model.vllm_engine import check_vllm_usable

        check_vllm_usable(cfg.model)
    inputs = [check_input(inspect_input(f), cfg.column) for f in files]  # every file, before anything is made
    try:  # before Ray starts and the models load: the blocks roughly take the inputs' size plus the new columns
        check_writable(out_dir, need_bytes=2 * sum(f.stat().st_size for f in files) + (1 << 20))
        (out_dir / CHECKS).mkdir(parents=True, exist_ok=True)
        with OutputLock(out_dir, "model.label --engine ray"):  # OUT.lock, beside the folder
            tasks = plan(cfg, inputs, output_names(files))
            done = {t.key: c for t in tasks if (c := finished_check(out_dir, t))}
            todo = [t for t in tasks if t.key not in done]
            rows = sum(t.rows for t in tasks)
            log(f"labelling {len(files)} file(s), {rows:,} rows in {len(tasks)} block(s) of up to {cfg.block_rows:,} "
                f"rows -> {out_dir}" + (f"; {len(done)} block(s) done already, kept" if done else ""))
            tidy(out_dir, tasks)
            if todo:
                (out_dir / MANIFEST).unlink(missing_ok=True)  # the manifest only ever describes a finished run
                run_on_ray(cfg, out_dir, todo, log, show_bar)
            checks = [finished_check(out_dir, t) for t in tasks]
            missing = [t.file for t, c in zip(tasks, checks, strict=True) if c is None]
            if missing:
                raise LabelError(f"{len(missing)} block(s) did not finish ({', '.join(missing[:3])}); rerun the same "
                                 "command to label them")
            atomic_write_json(out_dir / MANIFEST, manifest(cfg, inputs, tasks, checks, time.time() - started))
    except OutputError as err:
        raise LabelError(str(err)) from None
    result = RayLabelResult(out_dir, len(files), len(tasks), rows, sum(c["error_rows"] for c in checks),
                            len(done), time.time() - started)
    log(f"wrote {out_dir}: {rows:,} rows in {len(tasks)} block file(s), {result.error_rows:,} with an error, "
        f"{len(todo)} block(s) labelled now, in {result.seconds:.1f}s (manifest: {out_dir / MANIFEST})")
    return result


def main(argv: list[str] | None = None) -> RayLabelResult:
    from model.load import ModelLoadError

    try:
        cfg = parse_config(RayLabelConfig, argv, DESCRIPTION)
        _log_stderr(f"config: {json.dumps(dataclasses.asdict(cfg), ensure_ascii=False)}")
        return label_files(cfg)
    except (LabelError, OutputError, ModelLoadError) as err:
        raise SystemExit(f"error: {err}") from None
