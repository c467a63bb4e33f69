"""finetune.demo's small parts (the full pipeline is `make demo`; train/merge/evaluate have their own tests)."""

from __future__ import annotations

import json
import math

import pytest

from finetune import demo


def test_total_steps_of_the_shipped_preset():
    import yaml

    preset = yaml.safe_load(demo.DEMO_CONFIG.read_text(encoding="utf-8"))
    expected = math.ceil(preset["epochs"] * math.ceil(902 / (preset["batch_size"] * preset.get("grad_accum", 1))))
    assert demo.total_steps_of(demo.DEMO_CONFIG, 902) == expected


def test_total_steps_of_max_steps_and_missing(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("max_steps: 7\n")
    assert demo.total_steps_of(preset, 902) == 7
    assert demo.total_steps_of(tmp_path / "missing.yaml", 902) is None


def test_log_tail_prints_each_record_once(tmp_path, capsys):
    log = tmp_path / "train_log.jsonl"
    log.write_text(json.dumps({"step": 10, "loss": 2.5, "lr": 0.001}) + "\n")
    with demo.LogTail(log, total_steps=100, every_s=0.01) as tail:
        log.write_text(log.read_text() + json.dumps({"step": 20, "eval_loss": 2.0}) + "\n" + '{"step": 3')
        tail._print_new()
    out = capsys.readouterr().out
    assert out.count("step 10/100, loss 2.5, lr 0.001") == 1
    assert out.count("step 20/100, eval_loss 2") == 1
    assert "step 3" not in out  # a half-written line waits for the next read


def test_existing_model_is_kept(tmp_path, capsys, data_dir):
    (tmp_path / "merged").mkdir()
    assert demo.main(["--output-dir", str(tmp_path), "--data-dir", str(data_dir)]) == tmp_path / "merged"
    assert "exists" in capsys.readouterr().out


def test_missing_data_is_explained(tmp_path):
    with pytest.raises(SystemExit, match="make data"):
        demo.main(["--output-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path)])
