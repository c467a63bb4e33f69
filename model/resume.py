"""The labeller's resume protocol: an interrupted run, killed at any point, continues without relabelling
finished rows and ends byte-identical to an uninterrupted run (model.label writes; this decides what to reuse).

- rows are labelled in chunks and appended to `OUT.partial`;
- after each chunk the partial file is fsynced, then `OUT.progress.json` is replaced atomically with the
  run's key (the input's fingerprint, the settings, the model's files), rows done and the partial size;
- a rerun whose key matches truncates the partial file to the recorded size (dropping a half-written
  chunk), skips the rows done and goes on; anything else starts over, saying why.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from core.safe_io import atomic_write_json

if TYPE_CHECKING:
    from model.csv_file import Source
    from model.label import LabelConfig

PROGRESS_FORMAT = 2  # 2: the category_confidence column and --min-confidence


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
        **label_settings(cfg),
    }


def label_settings(cfg: LabelConfig) -> dict:
    """The settings and the model that decide a labelled row's bytes (model.label_ray keys its blocks by them too)."""
    return {
        "tasks": list(cfg.task_list),
        "chunk_rows": cfg.chunk_rows,
        "batch_size": cfg.batch_size,
        "min_confidence": cfg.min_confidence,
        "model": str(Path(cfg.model).resolve()),
        "model_files": model_stamp(Path(cfg.model)),
    }


def model_stamp(folder: Path) -> list:
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


def save_progress(output: Path, key: dict, rows: int, errors: int, offset: int) -> None:
    state = {"format": PROGRESS_FORMAT, "key": key, "rows_done": rows, "error_rows": errors, "partial_bytes": offset}
    atomic_write_json(progress_path(output), state, indent=1)
