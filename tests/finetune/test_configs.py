"""Every shipped config loads, names its launch command first, and sets only known options."""

import json
from pathlib import Path

import pytest

from core.config import parse_config
from finetune.train import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "finetune" / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"chatglm6b_lora.yaml", "demo_cpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_starts_with_its_launch_command(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and "finetune.train" in first and str(path.name) in first
    cfg = parse_config(TrainConfig, ["--config", str(path), "--base-model", "b", "--output-dir", "o"], "")
    assert cfg.base_model == "b"  # flags and YAML combine
    if cfg.deepspeed:
        ds = json.loads((Path(__file__).resolve().parents[2] / cfg.deepspeed).read_text())
        assert ds["zero_optimization"]["stage"] == 2


def test_flags_override_yaml(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("learning_rate: 0.5\nlora_r: 4\n")
    cfg = parse_config(
        TrainConfig, ["--config", str(preset), "--base-model", "b", "--output-dir", "o", "--lora-r", "16"], ""
    )
    assert (cfg.learning_rate, cfg.lora_r) == (0.5, 16)


def test_unknown_yaml_option_is_named(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("lora_rank: 4\n")
    with pytest.raises(SystemExit, match="lora_rank"):
        parse_config(TrainConfig, ["--config", str(preset), "--base-model", "b", "--output-dir", "o"], "")


def test_validate_lists_every_problem(tmp_path):
    cfg = TrainConfig(
        base_model=str(tmp_path / "none"), output_dir="o", data_dir=str(tmp_path), batch_size=0, lora_dropout=1.5
    )
    with pytest.raises(SystemExit) as err:
        cfg.validate()
    text = str(err.value)
    assert "no config.json" in text and "make data" in text and "--batch-size" in text and "--lora-dropout" in text
