"""ChatGLM test doubles built once per session, and a short run of each through train and merge.

The doubles (tests/doubles) load through trust_remote_code from a local dir with an auto_map, as a user's
ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B directory does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.data import DEV_FILE, TRAIN_FILE

DOUBLES = ["chatglm_v1", "chatglm2", "chatglm3"]
PRESETS = {"chatglm_v1": "chatglm6b_lora.yaml", "chatglm2": "chatglm2_lora.yaml", "chatglm3": "chatglm3_lora.yaml"}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, data_dir) -> Path:
    """24 training rows and 8 dev rows of each task: enough for a few steps, fast on 2 cores."""
    out = tmp_path_factory.mktemp("small_data")
    for name, per_task in ((TRAIN_FILE, 24), (DEV_FILE, 8)):
        rows = [json.loads(line) for line in (data_dir / name).open(encoding="utf-8")]
        cls = [r for r in rows if not r["target"].startswith("```")][:per_task]
        ext = [r for r in rows if r["target"].startswith("```")][:per_task]
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in cls + ext),
                                encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def double_base(tmp_path_factory, data_dir):
    from tests.doubles.build import build

    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build(kind, tmp_path_factory.mktemp("doubles") / kind, data_dir)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def double_merged(tmp_path_factory, double_base, small_data):
    """kind -> the merged dir of a short LoRA run with the family's preset (train, then merge, by their CLIs)."""
    from finetune import merge, train

    merged: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in merged:
            run = tmp_path_factory.mktemp("double_runs") / kind
            train.main(["--config", str(ROOT / "finetune" / "configs" / PRESETS[kind]), "--base-model",
                        str(double_base(kind)), "--data-dir", str(small_data), "--output-dir", str(run),
                        "--max-steps", "4", "--eval-steps", "2", "--max-source-len", "160", "--max-target-len", "96",
                        "--sample-decode", "2"])
            merged[kind] = merge.main(["--run", str(run)])
        return merged[kind]

    return get
