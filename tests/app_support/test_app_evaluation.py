"""app_support.evaluation: reading a labelled jsonl and reshaping model.evaluate's result."""

from __future__ import annotations

import json

import pytest

from app_support.evaluation import (
    load_examples,
    per_label_table,
    per_predicate_table,
    summary_json,
    task_counts,
    wrong_rows,
)
from core.dataset import DataError
from model.metrics import classification_metrics, triple_metrics
from model.parsing import Triple

TEMPLATE = "Instruction: 你是阅读理解器。\nInput: {phrasing}\n\n{text}\nAnswer: "
TRIPLE = {"predicate": "作者", "object_type": "人物", "subject_type": "图书作品", "object": "路遥",
          "subject": "平凡的世界"}
ROWS = [
    {"context": TEMPLATE.format(phrasing="这句话属于哪一类？", text="橙子很甜"), "target": '["水果"]'},
    {"context": TEMPLATE.format(phrasing="下面描述中包含了哪些SPO？", text="《平凡的世界》的作者是路遥"),
     "target": "```json\n" + json.dumps([TRIPLE], ensure_ascii=False) + "\n```"},
    {"context": TEMPLATE.format(phrasing="这句话属于哪一类？", text="房间很干净"), "target": '["酒店"]'},
]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def test_load_examples_from_upload_and_path(tmp_path):
    examples = load_examples(data=jsonl(ROWS), name="mine.jsonl")
    assert [e.task for e in examples] == ["classification", "extraction", "classification"]
    assert task_counts(examples) == {"classification": 2, "extraction": 1}
    assert len(load_examples(data=jsonl(ROWS), limit=2)) == 2
    path = tmp_path / "d.jsonl"
    path.write_bytes(jsonl(ROWS))
    assert len(load_examples(path)) == 3


def test_load_examples_errors_name_the_upload():
    with pytest.raises(DataError) as err:
        load_examples(data=b'{"context": "x"}\n', name="mine.jsonl")
    assert "mine.jsonl:1" in str(err.value) and "upload.jsonl" not in str(err.value)
    with pytest.raises(DataError, match="no rows"):
        load_examples(data=b"\n", name="mine.jsonl")
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(data="评论".encode("gbk") + b"\xff\n", name="mine.jsonl")


def metrics_like_evaluate() -> dict:
    cls = classification_metrics(["水果", "酒店"], ["水果", None], ["水果", "酒店"])
    gold = [Triple("平凡的世界", "作者", "路遥")]
    ie = triple_metrics([gold], [[Triple("平凡的世界", "作者", "平凡")]])
    return {
        "n": 3, "cls_n": 2, "ie_n": 1, "cls_accuracy": cls["accuracy"], "per_label": cls["per_label"],
        "confusion": cls["confusion"], "per_predicate": ie["per_predicate"],
        "predictions": [
            {"line": 1, "task": "classification", "text": "橙子很甜", "gold": "水果", "pred": "水果", "correct": True},
            {"line": 3, "task": "classification", "text": "房间很干净", "gold": "酒店", "pred": None,
             "correct": False, "warnings": ["classification: empty answer"]},
            {"line": 2, "task": "extraction", "text": "《平凡的世界》的作者是路遥", "gold": [TRIPLE],
             "pred": [dict(TRIPLE, object="平凡")], "correct": False, "warnings": []},
        ],
    }


def test_tables():
    metrics = metrics_like_evaluate()
    labels = per_label_table(metrics)
    assert labels.to_dict("records")[0] == {"label": "水果", "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert list(labels["label"]) == ["水果", "酒店"]
    predicates = per_predicate_table(metrics)
    assert predicates.to_dict("records") == [
        {"predicate": "作者", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    ]


def test_wrong_rows_and_summary():
    metrics = metrics_like_evaluate()
    wrong = wrong_rows(metrics)
    assert list(wrong["line"]) == [3, 2]
    assert wrong.iloc[0]["pred"] == "(none)"
    assert wrong.iloc[1]["gold"] == "(平凡的世界, 作者, 路遥)"
    assert wrong.iloc[0]["warnings"] == "classification: empty answer"
    assert list(wrong.columns) == ["line", "task", "gold", "pred", "text", "warnings"]
    summary = json.loads(summary_json(metrics))
    assert "predictions" not in summary and summary["n"] == 3


def test_long_texts_are_clipped_in_the_table():
    metrics = {"predictions": [{"line": 1, "task": "classification", "text": "长" * 200, "gold": "a", "pred": "b"}]}
    text = wrong_rows(metrics).iloc[0]["text"]
    assert len(text) == 80 and text.endswith("…")


def test_empty_metrics_give_empty_tables():
    assert len(wrong_rows({})) == 0 and len(per_label_table({})) == 0 and len(per_predicate_table({})) == 0
