"""model.evaluate on the dev file with the tiny merged model: constrained vs unconstrained."""

import json
from dataclasses import replace

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


# ---------------------------------------------------------------- strict metrics (#10), without a model


def fake_rows():
    from core.dataset import Example

    cls = Example(context="", target='["酒店"]', task="classification", instruction="", phrasing="p1",
                  text="房间干净", answer=["酒店"], line=1)
    gold = {"subject": "喜剧之王", "predicate": "主演", "object": "周星驰", "subject_type": "影视作品",
            "object_type": "人物"}
    ie = Example(context="", target="", task="extraction", instruction="", phrasing="p2",
                 text="《喜剧之王》是周星驰主演的电影", answer=[gold, {**gold, "object": "吴孟达"}], line=2)
    return [cls, ie], gold


def fake_predictions(well_formed: bool):
    from model.parsing import Triple
    from model.predict import Prediction

    def predict(lm, texts, tasks, phrasing=None, **_):
        task = tasks[0]
        if task == "classification":
            return [Prediction(text=t, category="酒店", raw={task: '"酒店"]'}, well_formed={task: well_formed})
                    for t in texts]
        triple = Triple("喜剧之王", "主演", "周星驰", "影视作品", "人物")
        return [Prediction(text=t, triples=[triple], raw={task: "..."}, well_formed={task: well_formed})
                for t in texts]

    return predict


@pytest.mark.parametrize("well_formed", [False, True])
def test_a_malformed_answer_is_never_counted_correct_in_strict_metrics(monkeypatch, well_formed):
    from types import SimpleNamespace

    rows, _ = fake_rows()
    monkeypatch.setattr(evaluate, "predict", fake_predictions(well_formed))
    lm = SimpleNamespace(schema={"labels": ["酒店", "水果"]}, path="fake")
    metrics = evaluate.evaluate(lm, rows)
    assert metrics["lenient_cls_accuracy"] == 1.0 and metrics["lenient_triple_precision"] == 1.0
    assert metrics["cls_accuracy"] == (1.0 if well_formed else 0.0)
    assert metrics["triple_precision"] == (1.0 if well_formed else 0.0)  # nothing strictly predicted
    assert metrics["triple_recall"] == (0.5 if well_formed else 0.0)
    assert [r["correct"] for r in metrics["predictions"]] == [well_formed, False]
    assert metrics["gold_spans_not_in_text"] == 1  # 吴孟达 is not in the text
    assert metrics["gold_spans_missing"] == [{"line": 2, "role": "object", "span": "吴孟达"}]


def test_data_prompts_ask_each_row_with_its_own_phrasing(monkeypatch):
    from types import SimpleNamespace

    rows, _ = fake_rows()
    asked = []
    inner = fake_predictions(True)

    def spy(lm, texts, tasks, phrasing=None, **kwargs):
        asked.append((tasks[0], phrasing))
        return inner(lm, texts, tasks, phrasing, **kwargs)

    monkeypatch.setattr(evaluate, "predict", spy)
    lm = SimpleNamespace(schema={"labels": ["酒店"]}, path="fake")
    evaluate.evaluate(lm, rows, prompts="data")
    assert asked == [("classification", {"classification": "p1"}), ("extraction", {"extraction": "p2"})]
    asked.clear()
    metrics = evaluate.evaluate(lm, rows)
    assert asked == [("classification", None), ("extraction", None)] and metrics["prompts"] == "canonical"


def test_the_category_baseline_learns_from_the_training_rows(data_dir):
    from core.dataset import read_jsonl
    from model.baseline import baseline_labels

    train = read_jsonl(data_dir / "mixed_train_dataset.jsonl")
    dev = [ex for ex in read_jsonl(data_dir / "mixed_dev_dataset.jsonl") if ex.task == "classification"]
    got = baseline_labels(train, [ex.text for ex in dev])
    accuracy = sum(g == ex.answer[0] for g, ex in zip(got, dev, strict=True)) / len(dev)
    assert accuracy > 0.75  # the reference data: 0.810; a broken fit is near 1/len(labels)
    one_label = [ex for ex in train if ex.task == "classification" and ex.answer[0] == dev[0].answer[0]]
    assert baseline_labels(one_label, ["苹果很甜"]) is None  # one class: no model to fit


def test_evaluate_reports_the_baseline_next_to_the_model(monkeypatch):
    from types import SimpleNamespace

    rows, _ = fake_rows()
    extra = [replace(rows[0], text="苹果很甜很新鲜", answer=["水果"]), replace(rows[0], text="酒店房间很干净")]
    monkeypatch.setattr(evaluate, "predict", fake_predictions(True))
    lm = SimpleNamespace(schema={"labels": ["酒店", "水果"]}, path="fake")
    metrics = evaluate.evaluate(lm, rows, baseline_train=extra)
    assert 0.0 <= metrics["baseline_cls_accuracy"] <= 1.0
    assert evaluate.evaluate(lm, rows)["baseline_cls_accuracy"] is None


def test_hallucination_rate_is_the_share_of_comments_given_a_triple(monkeypatch):
    from types import SimpleNamespace

    rows, _ = fake_rows()
    extra = replace(rows[0], text="苹果很甜", answer=["水果"], line=3)
    asked = []
    inner = fake_predictions(True)

    def predict(lm, texts, tasks, phrasing=None, **kwargs):
        asked.append((tasks[0], list(texts)))
        preds = inner(lm, texts, tasks, phrasing, **kwargs)
        if tasks[0] == "extraction":  # no triple for the fruit comment
            for p in preds:
                p.triples = [] if p.text == "苹果很甜" else p.triples
        return preds

    monkeypatch.setattr(evaluate, "predict", predict)
    lm = SimpleNamespace(schema={"labels": ["酒店", "水果"], "predicates": {"主演": {}}}, path="fake")
    metrics = evaluate.evaluate(lm, [rows[0], extra, rows[1]])
    assert ("extraction", ["房间干净", "苹果很甜"]) in asked  # the comments asked for triples too
    assert metrics["hallucination_rate"] == 0.5
    assert metrics["n"] == 3
