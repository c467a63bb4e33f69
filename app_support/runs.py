"""Training runs on disk: runs/<name>/{train_log.jsonl, train_config.json} (no streamlit here)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"


@dataclass(frozen=True)
class Run:
    name: str
    path: Path

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE


def discover_runs(roots: Iterable[Path | str]) -> list[Run]:
    """Every folder directly under a root that holds a train_log.jsonl, newest log first.

    A run found under two roots (e.g. runs/ and the served model's own runs folder) is listed once.
    Names are unique: a clash across roots gets the root's name prefixed.
    """
    found: dict[Path, Run] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for log in root.glob(f"*/{LOG_FILE}"):
            folder = log.parent.resolve()
            if folder not in found:
                found[folder] = Run(log.parent.name, log.parent)
    runs = sorted(found.values(), key=lambda run: run.log_path.stat().st_mtime, reverse=True)
    names = [run.name for run in runs]
    return [
        Run(f"{run.path.parent.name}/{run.name}", run.path) if names.count(run.name) > 1 else run for run in runs
    ]


def read_log(path: Path | str) -> list[dict]:
    """The records of a train_log.jsonl; a broken or half-written line (a run still writing) is skipped."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged quantity (loss, eval_loss, lr), in step order."""
    points = sorted(
        (r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)
    )
    return [p[0] for p in points], [p[1] for p in points]


def read_train_config(run_dir: Path | str) -> dict | None:
    """train_config.json of a run, or None if missing or unreadable."""
    try:
        data = json.loads((Path(run_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def summary(records: list[dict]) -> dict:
    """Last step, last train loss, best eval loss, and the last sample decode's well-formed and correct
    rates (finetune/sample_decode.py) of a run; None when not logged."""
    steps, losses = series(records, "loss")
    eval_steps, eval_losses = series(records, "eval_loss")
    best = min(range(len(eval_losses)), key=eval_losses.__getitem__) if eval_losses else None
    last_step = max((r["step"] for r in records), default=None)
    _, well_formed = series(records, "sample_well_formed")
    _, correct = series(records, "sample_correct")
    return {
        "last_step": last_step,
        "last_loss": losses[-1] if losses else None,
        "best_eval_loss": eval_losses[best] if best is not None else None,
        "best_eval_step": eval_steps[best] if best is not None else None,
        "sample_well_formed": well_formed[-1] if well_formed else None,
        "sample_correct": correct[-1] if correct else None,
    }


# The train_config.json fields worth comparing between runs, in display order.
KEY_CONFIG_FIELDS = (
    "family", "method", "epochs", "max_steps", "total_steps", "batch_size", "grad_accum", "learning_rate",
    "lr_scheduler", "warmup_ratio", "lora_r", "lora_alpha", "lora_dropout", "max_source_len", "max_target_len",
    "precision", "trainable_params", "total_params", "n_train", "n_dev", "base_model",
)


def config_table(configs: dict[str, dict | None]) -> dict[str, dict[str, str]]:
    """{run: {field: value as text}} for KEY_CONFIG_FIELDS, '' where a run lacks a field.

    Values become text so one column can hold numbers, names and nulls (Arrow wants one type per column).
    """
    table = {}
    # LoRA settings mean nothing for a full fine-tuning run: blank there, and gone if no run shown used LoRA.
    any_lora = any((config or {}).get("method", "lora") == "lora" for config in configs.values())
    fields = [key for key in KEY_CONFIG_FIELDS if any_lora or not key.startswith("lora_")]
    for run, config in configs.items():
        config = config or {}
        full = config.get("method") == "full"
        table[run] = {key: "" if config.get(key) is None or (full and key.startswith("lora_")) else str(config[key])
                      for key in fields}
        table[run]["base_model"] = short_path(table[run]["base_model"])
    return table


def short_path(path: str, keep: int = 2) -> str:
    """The last `keep` parts of a long path (…/demo/base): the whole one is in the full JSON below the table."""
    parts = Path(path).parts
    return path if len(parts) <= keep + 1 else "…/" + "/".join(parts[-keep:])
