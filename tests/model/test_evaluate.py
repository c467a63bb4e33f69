"""model.evaluate on the dev file with the tiny merged model: constrained vs unconstrained."""

import json

import pytest

from model import evaluate

FLAT = ["n", "cls_n", "cls_accuracy", "cls_macro_f1", "ie_n", "triple_precision", "triple_recall", "triple_f1",
        "parse_rate", "examples_per_second"]


@pytest.fixture(scope="module")
def both_modes(merged_model, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    dev = str(data_dir / "mixed_dev_dataset.jsonl")
    constrained = evaluate.main(["--model", str(merged_model), "--data", dev, "--output", str(out / "c.json")])
    # 40 rows are enough to show the difference; unconstrained answers run to the token limit (slow).
    unconstrained = evaluate.main(["--model", str(merged_model), "--data", dev, "--output", str(out / "u.json"),
                                   "--unconstrained", "--limit", "40"])
    return out, constrained, unconstrained


def test_constrained_dev_answers_all_parse_are_grounded_and_end_in_budget(both_modes):
    out, metrics, _ = both_modes
    assert (metrics["n"], metrics["cls_n"], metrics["ie_n"]) == (122, 63, 59)
    assert metrics["parse_rate"] == 1.0
    assert metrics["label_in_set_rate"] == 1.0
    assert metrics["hit_limit_rate"] == 0.0
    assert metrics["span_grounded_rate"] in (1.0, None)  # None only if no triple was emitted at all
    saved = json.loads((out / "c.json").read_text())
    assert all(key in saved for key in FLAT) and saved["constrained"] is True
    rows = (out / "c.predictions.jsonl").read_text().splitlines()
    assert len(rows) == 122 and {"gold", "pred", "raw", "correct"} <= set(json.loads(rows[0]))


def test_unconstrained_shows_the_difference_in_the_same_format(both_modes):
    out, constrained, unconstrained = both_modes
    saved = json.loads((out / "u.json").read_text())
    assert set(saved) == set(json.loads((out / "c.json").read_text()))
    assert saved["constrained"] is False
    # A briefly trained tiny model cannot answer well-formed on its own.
    assert unconstrained["parse_rate"] < constrained["parse_rate"]


def test_bad_data_file_is_named(merged_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    with pytest.raises(SystemExit, match="bad.jsonl:1: invalid JSON"):
        evaluate.main(["--model", str(merged_model), "--data", str(bad)])
