"""Fixtures of the training tests."""

from pathlib import Path

import pytest

from core.dataset import TRAIN_FILE


@pytest.fixture()
def small_data(tmp_path, data_dir) -> Path:
    """64 training rows and no dev file: the last step's adapter is the saved one (a fresh copy per test,
    which may edit it). Shadows the session-wide small_data of tests/conftest.py in this folder."""
    folder = tmp_path / "data"
    folder.mkdir()
    lines = (data_dir / TRAIN_FILE).read_text(encoding="utf-8").splitlines()[:64]
    (folder / TRAIN_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder
