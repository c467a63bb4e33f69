"""finetune.demo's small parts (the full pipeline is `make demo`; train/merge/evaluate have their own tests)."""

from __future__ import annotations

import pytest

from finetune import demo


def test_progress_line():
    line = demo.progress_line(20, 80, {"loss": 2.51234, "learning_rate": 0.001, "epoch": 1.0}, 120.0)
    assert line == "step 20/80, loss 2.512, lr 0.001, 2.0 min, ~6.0 min left"
    assert demo.progress_line(0, 0, {"eval_loss": 2.0}, 5.0) == "step 0, eval_loss 2"


def test_training_progress_is_printed_by_a_trainer_callback(tmp_path, tiny_base, small_data, capsys):
    """The demo's progress comes from the Trainer itself: its step count and its total, no log polling."""
    from finetune import train
    from tests.finetune.test_train import run_args

    train.main(run_args(tiny_base, small_data, tmp_path / "run", 3), callbacks=[demo.progress_callback()])
    lines = [line.strip() for line in capsys.readouterr().out.splitlines() if line.startswith("  step ")]
    assert [line.split(",")[0] for line in lines if ", loss " in line] == ["step 1/3", "step 2/3", "step 3/3"]
    assert "min left" in lines[0]


def test_existing_model_is_kept(tmp_path, capsys, data_dir):
    (tmp_path / "merged").mkdir()
    assert demo.main(["--output-dir", str(tmp_path), "--data-dir", str(data_dir)]) == tmp_path / "merged"
    assert "exists" in capsys.readouterr().out


def test_missing_data_is_explained(tmp_path):
    with pytest.raises(SystemExit, match="make data"):
        demo.main(["--output-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path)])
