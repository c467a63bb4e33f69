"""Shared fixtures: the reference data, a tiny base model, a briefly trained run and its merged model.

Everything is built locally in seconds; nothing touches the network.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and spinning OpenMP threads slow a loaded 2-core box
# by an order of magnitude; subprocesses (torchrun, CLIs, the app) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from core import compat  # noqa: E402
from core.dataset import DEV_FILE, TRAIN_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODERN_LANE = compat.transformers_major() >= 5


def pytest_collection_modifyitems(config, items):
    """Each lane runs the tests of the families it supports (README: "Which lane"); the others are reported
    as skipped with why. tests/test_lanes.py checks what a user meets on the wrong lane."""
    import transformers

    if MODERN_LANE:
        reason = (f"ChatGLM remote code runs on the legacy lane only (transformers {transformers.__version__} "
                  "here; make test LANE=legacy)")
        marker = "legacy_lane"
    else:
        reason = (f"GLM-4 and Qwen2/3 need the modern lane (transformers {transformers.__version__} here; "
                  "make test LANE=modern)")
        marker = "modern_lane"
    for item in items:
        if item.get_closest_marker(marker):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    folder = ROOT / "data"
    missing = [name for name in (TRAIN_FILE, DEV_FILE) if not (folder / name).is_file()]
    if missing:
        pytest.fail(f"data/ lacks {missing}: run `make data` first")
    return folder


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, data_dir) -> Path:
    from finetune.tiny import TinyConfig, build_tiny

    return build_tiny(TinyConfig(output_dir=str(tmp_path_factory.mktemp("tiny_base")), data_dir=str(data_dir)))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_base, data_dir) -> Path:
    """A LoRA run of 30 steps on the reference data (the acceptance command, in-process)."""
    from finetune import train

    run = tmp_path_factory.mktemp("runs") / "x"
    train.main(
        [
            "--base-model",
            str(tiny_base),
            "--data-dir",
            str(data_dir),
            "--output-dir",
            str(run),
            "--max-steps",
            "30",
            "--logging-steps",
            "5",
        ]
    )
    return run


@pytest.fixture(scope="session")
def merged_model(trained_run) -> Path:
    from finetune import merge

    return merge.main(["--run", str(trained_run)])


# --------------------------------------------------------------------------- ChatGLM test doubles
# Built once per session (tests/doubles), loaded through trust_remote_code from a local dir with an
# auto_map, as a user's ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B directory is. Here, not in tests/chatglm,
# because the browser tests (tests/e2e) use them too.

PRESETS = {"chatglm_v1": "chatglm6b_lora.yaml", "chatglm2": "chatglm2_lora.yaml", "chatglm3": "chatglm3_lora.yaml"}


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


def train_and_merge(preset: str, base: Path, data: Path, run: Path, *options: str) -> Path:
    """A short LoRA run with a family's preset, then its merge, through the CLIs' entry points."""
    from finetune import merge, train

    train.main(["--config", str(ROOT / "finetune" / "configs" / preset), "--base-model", str(base), "--data-dir",
                str(data), "--output-dir", str(run), "--sample-decode", "2", *options])
    return merge.main(["--run", str(run)])


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
    merged: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in merged:
            run = tmp_path_factory.mktemp("double_runs") / kind
            merged[kind] = train_and_merge(PRESETS[kind], double_base(kind), small_data, run, "--max-steps", "4",
                                           "--eval-steps", "2", "--max-source-len", "160", "--max-target-len", "96")
        return merged[kind]

    return get


# The modern lane's families (finetune.tiny --arch), trained with their presets as a user would.
MODERN_ARCHS = ("qwen2", "qwen3", "glm", "glm4")
MODERN_PRESETS = {"qwen2": "qwen3_lora.yaml", "qwen3": "qwen3_lora.yaml", "glm": "glm4_lora.yaml",
                  "glm4": "glm4_lora.yaml"}


@pytest.fixture(scope="session")
def modern_merged(tmp_path_factory, data_dir, small_data):
    """arch -> the merged dir of a short LoRA run on that architecture's tiny random model (train, then merge)."""
    from finetune.tiny import TinyConfig, build_tiny

    merged: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in merged:
            folder = tmp_path_factory.mktemp("modern") / arch
            base = build_tiny(TinyConfig(output_dir=str(folder / "base"), data_dir=str(data_dir), arch=arch))
            # The preset's 300-token answers: with one token per character a triple takes ~80 tokens, and a
            # shorter budget would leave the grammar nothing to write but [] (no spans to compare).
            merged[arch] = train_and_merge(MODERN_PRESETS[arch], base, small_data, folder / "run",
                                           "--max-steps", "12", "--eval-steps", "6")
        return merged[arch]

    return get


# ---------------------------------------------------------------- folders that refuse writes
# Real ones, so the code meets the errors a user's disk gives: as root (CI, these VMs) a small tmpfs,
# mounted read-only or filled up (root writes through permission bits); as another user, a folder
# without write permission. Only a non-root user without the tmpfs cannot get a full disk: then the
# fixture says so and the test does not run.


def mount_tmpfs(folder: Path, options: str) -> bool:
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def unmount(folder: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture()
def readonly_dir(tmp_path):
    """A folder no file can be created in (EROFS or EACCES)."""
    folder = tmp_path / "readonly"
    if mount_tmpfs(folder, "ro,size=1m"):
        yield folder
        unmount(folder)
        return
    if os.geteuid() == 0:  # root writes through permission bits: only a read-only mount refuses it
        pytest.skip("a read-only folder for root needs a tmpfs mount, which this machine refused")
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.fixture()
def full_dir(tmp_path):
    """A folder on a full filesystem: creating an empty file works, writing a byte fails with ENOSPC."""
    folder = tmp_path / "full"
    if not mount_tmpfs(folder, "size=256k"):
        pytest.skip("a full filesystem needs root to mount a small tmpfs (CI runs as root)")
    try:
        with (folder / "filler").open("wb") as handle:
            while True:
                handle.write(b"0" * 4096)
                handle.flush()
    except OSError:
        pass
    yield folder
    unmount(folder)
