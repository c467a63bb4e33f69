"""Shared fixtures: the reference data, a tiny base model, a briefly trained run and its merged model.

Everything is built locally in seconds; nothing touches the network.
"""

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

from finetune.data import DEV_FILE, TRAIN_FILE  # noqa: E402

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
