"""app_support.settings: the model path from argv, the no-model commands, metrics for the sidebar."""

from __future__ import annotations

import json
from pathlib import Path

from app_support.settings import (
    DEFAULT_MODEL_DIR,
    format_metric,
    headline_metrics,
    model_dir_from_argv,
    model_summary,
    read_metrics,
    setup_commands,
)


def test_model_dir_default_and_given():
    assert model_dir_from_argv(["app.py"]) == Path(DEFAULT_MODEL_DIR)
    assert model_dir_from_argv(["app.py", "--model", "runs/a/merged"]) == Path("runs/a/merged")
    assert model_dir_from_argv(["app.py", "--model=/m"]) == Path("/m")


def test_model_dir_ignores_unknown_flags():
    # A page must not die with SystemExit because someone passed an extra flag.
    assert model_dir_from_argv(["app.py", "--foo", "1", "--model", "m"]) == Path("m")


def test_setup_commands_for_the_demo_model_mention_make_demo():
    text = "\n".join(setup_commands(DEFAULT_MODEL_DIR))
    assert "make demo" in text
    assert "python -m finetune.demo --output-dir runs/demo" in text
    assert "streamlit run app.py -- --model runs/demo/merged" in text


def test_setup_commands_for_another_run_use_its_folder():
    text = "\n".join(setup_commands("runs/big/merged"))
    assert "--output-dir runs/big" in text
    assert "python -m finetune.merge --run runs/big" in text
    assert "--model runs/big/merged" in text


def test_setup_commands_for_any_folder_name_it_once():
    commands = setup_commands("/my models/m")
    assert commands[1] == "MODEL='/my models/m'"  # quoted for the shell
    assert 'streamlit run app.py -- --model "$MODEL"' in commands
    assert sum("/my models/m" in line for line in commands) == 1


def test_read_metrics(tmp_path):
    assert read_metrics(tmp_path) is None
    (tmp_path / "metrics.json").write_text("{not json", encoding="utf-8")
    assert read_metrics(tmp_path) is None
    (tmp_path / "metrics.json").write_text("[1, 2]", encoding="utf-8")
    assert read_metrics(tmp_path) is None
    (tmp_path / "metrics.json").write_text(json.dumps({"n": 3, "cls_accuracy": 0.5}), encoding="utf-8")
    assert read_metrics(tmp_path) == {"n": 3, "cls_accuracy": 0.5}


def test_headline_metrics_format_and_order():
    rows = headline_metrics({"triple_f1": None, "cls_accuracy": 0.66666, "n": 3, "parse_rate": 1.0})
    assert rows[0] == ("类别准确率 accuracy", "0.667")
    assert ("三元组 F1", "–") in rows  # nothing evaluated is a dash, never 0
    assert ("格式正确率 parse rate", "1.000") in rows
    assert len(rows) == 3
    assert format_metric(5) == "5"


def test_model_summary():
    info = {"path": "m", "family": "causal", "parameters": 1234567, "device": "cpu", "dtype": "fp32",
            "labels": ["水果", "酒店"], "predicates": ["作者"]}
    rows = dict(model_summary(info))
    assert rows["参数 parameters"] == "1,234,567"
    assert rows["类别 labels"] == "2: 水果、酒店"
    assert rows["关系 predicates"] == "1: 作者"


def test_the_demo_banner_appears_only_for_the_demo_model_and_states_its_dev_metrics():
    from app_support.settings import demo_banner

    assert demo_banner({"labels": []}, 1_300_000, None) is None
    line = demo_banner({"demo": True}, 1_300_000, {"cls_accuracy": 0.6826, "triple_f1": 0.1, "n": 122})
    assert "1.3M-parameter toy" in line and "accuracy 0.683" in line and "n = 122" in line
    assert "Dev:" not in demo_banner({"demo": True}, 1_300_000, None)
