"""Where the app finds its model, and what to tell a user who has none (no streamlit here)."""

from __future__ import annotations

import argparse
import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from core.dataset import DEV_FILE, TRAIN_FILE

DEFAULT_MODEL_DIR = "runs/demo/merged"
# Uploads bigger than this are refused: a CSV of short comments this size already holds ~200k rows,
# more than a browser session should label in one go (use `python -m model.label` for those).
MAX_UPLOAD_MB = 20
# Where `make data` puts the reference dataset (core.dataset names the files).
DEV_DATA_PATH = f"data/{DEV_FILE}"
TRAIN_DATA_PATH = f"data/{TRAIN_FILE}"


ALLOW_WRITES_ENV = "LABELLER_ALLOW_WRITES"


def _app_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", default=DEFAULT_MODEL_DIR)
    parser.add_argument("--allow-writes", action="store_true")
    # parse_known_args: unknown flags must not kill a page with SystemExit.
    args, _unknown = parser.parse_known_args(list(argv)[1:])
    return args


def model_dir_from_argv(argv: Sequence[str]) -> Path:
    """The --model given after `streamlit run app.py --`; every page sees the same sys.argv."""
    return Path(_app_args(argv).model)


def writes_allowed(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether visitors may write into the model directory (save evaluation results there).

    Off by default: anyone who can open the app could otherwise replace the served model's metrics.json,
    which every other visitor then sees in the sidebar. The server's owner opts in with
    `streamlit run app.py -- --allow-writes` or LABELLER_ALLOW_WRITES=1."""
    return _app_args(argv).allow_writes or environ.get(ALLOW_WRITES_ENV, "").strip().lower() in ("1", "true", "yes")


def user_message(err: BaseException) -> str:
    """One line for the page: an OSError says what failed (no space, read-only, permission) without the
    server's paths; anything else its type and text."""
    if isinstance(err, OSError):
        reason = err.strerror or type(err).__name__
        return f"{type(err).__name__}: {reason} (the server could not read or write a file)"
    return f"{type(err).__name__}: {err}"


def setup_commands(model_dir: Path | str) -> list[str]:
    """The exact commands that make a servable model, to show when there is none at model_dir.

    Long commands are split with shell line continuations so they fit the page without scrolling.
    """
    model_dir = Path(model_dir)
    quoted = shlex.quote(str(model_dir))
    if model_dir == Path(DEFAULT_MODEL_DIR):
        return [
            "make demo    # venv, data, CPU demo model (8-13 min on 2 cores), then starts this app",
            "# or step by step:",
            "python -m finetune.demo --output-dir runs/demo",
            f"streamlit run app.py -- --model {quoted}",
        ]
    if model_dir.name == "merged":  # runs/NAME/merged: merge's default output, no --output-dir needed
        run = shlex.quote(str(model_dir.parent))
        return [
            "# ChatGLM-6B weights in a local folder, e.g. /models/chatglm-6b; data in data/ (make data)",
            "python -m finetune.train --config finetune/configs/chatglm6b_lora.yaml \\",
            f"    --base-model /models/chatglm-6b --data-dir data --output-dir {run}",
            f"python -m finetune.merge --run {run}",
            f"python -m model.evaluate --model {quoted} \\",
            f"    --data {DEV_DATA_PATH} --output {shlex.quote(str(model_dir / 'metrics.json'))}",
            f"streamlit run app.py -- --model {quoted}",
        ]
    # Any other folder: named once in $MODEL, so a long path makes one long line, not five.
    return [
        "# ChatGLM-6B weights in a local folder, e.g. /models/chatglm-6b; data in data/ (make data)",
        f"MODEL={quoted}",
        "python -m finetune.train --config finetune/configs/chatglm6b_lora.yaml \\",
        "    --base-model /models/chatglm-6b --data-dir data --output-dir runs/NAME",
        'python -m finetune.merge --run runs/NAME --output-dir "$MODEL"',
        f'python -m model.evaluate --model "$MODEL" --data {DEV_DATA_PATH} --output "$MODEL/metrics.json"',
        'streamlit run app.py -- --model "$MODEL"',
    ]


def read_metrics(model_dir: Path | str) -> dict | None:
    """model_dir/metrics.json as written by model.evaluate, or None if absent or unreadable."""
    path = Path(model_dir) / "metrics.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# Shown in the sidebar and on the evaluation page, in this order: (metrics.json key, label).
HEADLINE_METRICS = (
    ("cls_accuracy", "类别准确率 accuracy"),
    ("cls_macro_f1", "类别 macro-F1"),
    ("triple_precision", "三元组 precision"),
    ("triple_recall", "三元组 recall"),
    ("triple_f1", "三元组 F1"),
    ("parse_rate", "格式正确率 parse rate"),
    ("examples_per_second", "条/秒 examples/s"),
)


def format_metric(value: object) -> str:
    """Scores to 3 decimals; None (nothing evaluated) as a dash, not 0."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def headline_metrics(metrics: dict) -> list[tuple[str, str]]:
    """(label, formatted value) for the headline keys present in a metrics dict."""
    return [(label, format_metric(metrics.get(key))) for key, label in HEADLINE_METRICS if key in metrics]


def model_summary(info: dict) -> list[tuple[str, str]]:
    """(name, value) rows for the sidebar from LoadedModel.info()."""
    params = info.get("parameters")
    return [
        ("路径 path", str(info.get("path", ""))),
        ("家族 family", str(info.get("family", ""))),
        ("参数 parameters", f"{params:,}" if isinstance(params, int) else str(params)),
        ("设备 device", str(info.get("device", ""))),
        ("精度 dtype", str(info.get("dtype", ""))),
        ("类别 labels", f"{len(info.get('labels', []))}: " + "、".join(info.get("labels", []))),
        ("关系 predicates", f"{len(info.get('predicates', []))}: " + "、".join(info.get("predicates", []))),
    ]


def demo_banner(schema: dict, n_params: int | None, metrics: dict | None) -> str | None:
    """The one line every page shows when the served model is finetune.demo's toy (schema "demo": true)."""
    if not schema.get("demo"):
        return None
    size = f"{n_params / 1e6:.1f}M" if isinstance(n_params, int) else "a tiny"
    line = (f"演示模型 Demo model: a {size}-parameter toy trained from scratch on a CPU in minutes. It shows the "
            "machinery (constrained decoding, CSV labelling), not the quality of a fine-tuned ChatGLM-6B; "
            "its triples are mostly wrong.")
    if metrics and metrics.get("cls_accuracy") is not None:
        line += (f" Dev: category accuracy {format_metric(metrics.get('cls_accuracy'))}, triple F1 "
                 f"{format_metric(metrics.get('triple_f1'))} (n = {metrics.get('n', '?')}).")
    return line
