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

from core.dataset import DEV_FILE, TRAIN_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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
