"""app_support.runs and app_support.plots (+ fonts): runs on disk, loss curves, confusion matrix."""

from __future__ import annotations

import json
import os
import warnings

import pytest
from matplotlib.figure import Figure

from app_support.fonts import cjk_font_name, use_cjk_font
from app_support.plots import confusion_figure, loss_figure
from app_support.runs import (
    KEY_CONFIG_FIELDS,
    config_table,
    discover_runs,
    read_log,
    read_train_config,
    series,
    short_path,
    summary,
)

LOG = [
    {"step": 5, "epoch": 0.1, "loss": 3.0, "lr": 0.001},
    {"step": 6, "epoch": 0.1, "eval_loss": 2.9},
    {"step": 10, "epoch": 0.2, "loss": 2.0, "lr": 0.0005},
    {"step": 12, "epoch": 0.2, "eval_loss": 2.5},
]


def write_run(root, name, records=LOG, config=None, mtime=None):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    if config is not None:
        (folder / "train_config.json").write_text(json.dumps(config), encoding="utf-8")
    if mtime is not None:
        os.utime(folder / "train_log.jsonl", (mtime, mtime))
    return folder


def test_discover_runs_newest_first_and_deduplicated(tmp_path):
    write_run(tmp_path / "runs", "old", mtime=1_000)
    write_run(tmp_path / "runs", "new", mtime=2_000)
    (tmp_path / "runs" / "no_log").mkdir()
    runs = discover_runs([tmp_path / "runs", tmp_path / "runs", tmp_path / "missing"])
    assert [run.name for run in runs] == ["new", "old"]


def test_discover_runs_name_clash_gets_the_root(tmp_path):
    write_run(tmp_path / "a", "x")
    write_run(tmp_path / "b", "x")
    assert sorted(run.name for run in discover_runs([tmp_path / "a", tmp_path / "b"])) == ["a/x", "b/x"]


def test_read_log_skips_broken_lines(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text('{"step": 1, "loss": 2}\nnot json\n[1]\n{"loss": 3}\n{"step": 2, "loss": 1', encoding="utf-8")
    assert read_log(path) == [{"step": 1, "loss": 2}]
    assert read_log(tmp_path / "missing.jsonl") == []


def test_series_and_summary():
    assert series(LOG, "loss") == ([5, 10], [3.0, 2.0])
    assert series(LOG, "eval_loss") == ([6, 12], [2.9, 2.5])
    none = {"sample_well_formed": None, "sample_correct": None}
    assert summary(LOG) == {"last_step": 12, "last_loss": 2.0, "best_eval_loss": 2.5, "best_eval_step": 12, **none}
    assert summary([]) == {"last_step": None, "last_loss": None, "best_eval_loss": None, "best_eval_step": None,
                           **none}
    # The last sample decode's rates (finetune/sample_decode.py logs them after each evaluation).
    sampled = LOG + [{"step": 6, "sample_n": 4, "sample_well_formed": 0.25, "sample_correct": 0.0},
                     {"step": 12, "sample_n": 4, "sample_well_formed": 0.75, "sample_correct": 0.5}]
    assert summary(sampled)["sample_well_formed"] == 0.75 and summary(sampled)["sample_correct"] == 0.5
    assert summary(sampled)["last_loss"] == 2.0  # sample records carry no loss


def test_read_train_config_and_config_table(tmp_path):
    folder = write_run(tmp_path, "r", config={"method": "lora", "learning_rate": 0.001, "lora_targets": None,
                                              "base_model": "/work/main/runs/demo/base"})
    assert read_train_config(folder)["method"] == "lora"
    assert read_train_config(tmp_path / "nothing") is None
    table = config_table({"r": read_train_config(folder), "missing": None})
    assert list(table["r"]) == list(KEY_CONFIG_FIELDS)
    assert table["r"]["learning_rate"] == "0.001"
    assert table["missing"]["method"] == ""
    assert table["r"]["base_model"] == "…/demo/base"
    assert short_path("runs/demo") == "runs/demo"


def test_cjk_font_is_found():
    if cjk_font_name() is None:
        pytest.skip("no CJK font installed (make system-deps installs fonts-noto-cjk)")
    assert "CJK" in cjk_font_name() or "Hei" in cjk_font_name()


def _render(fig: Figure, tmp_path) -> list[str]:
    """Draw to PNG and return matplotlib's missing-glyph warnings (Chinese drawn as boxes)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(tmp_path / "fig.png")
    return [str(w.message) for w in caught if "missing from" in str(w.message)]


def test_loss_figure_draws_chinese_without_missing_glyphs(tmp_path):
    if use_cjk_font() is None:
        pytest.skip("no CJK font installed")
    fig = loss_figure({"运行一": LOG, "b": [{"step": 1, "loss": 1.0}]})
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # run one: train + eval; run b: train only
    assert ax.get_xlabel() == "步数 step"
    assert _render(fig, tmp_path) == []


def test_loss_figure_without_any_loss(tmp_path):
    fig = loss_figure({"empty": []})
    assert len(fig.axes[0].lines) == 0
    _render(fig, tmp_path)


def test_confusion_figure(tmp_path):
    use_cjk_font()
    confusion = {"labels": ["水果", "酒店"], "columns": ["水果", "酒店", "(none)"], "matrix": [[3, 1, 0], [0, 2, 1]]}
    fig = confusion_figure(confusion)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sorted(texts) == ["1", "1", "2", "3"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["水果", "酒店", "(none)"]
    if cjk_font_name():
        assert _render(fig, tmp_path) == []


def test_lora_settings_are_not_shown_for_full_fine_tuning_runs():
    from app_support.runs import config_table

    full = {"method": "full", "lora_r": 8, "epochs": 12}
    lora = {"method": "lora", "lora_r": 16, "epochs": 3}
    only_full = config_table({"demo": full})
    assert "lora_r" not in only_full["demo"] and only_full["demo"]["epochs"] == "12"
    mixed = config_table({"demo": full, "gpu": lora})
    assert mixed["demo"]["lora_r"] == "" and mixed["gpu"]["lora_r"] == "16"
