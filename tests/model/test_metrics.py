"""model.metrics against values computed by hand on small fixtures."""

from __future__ import annotations

import pytest

from model.metrics import NONE_COLUMN, classification_metrics, triple_metrics
from model.parsing import Triple

LABELS = ["水果", "衣服", "酒店"]


# --------------------------------------------------------------------------- classification


def test_classification_perfect():
    gold = ["水果", "衣服", "酒店", "水果"]
    result = classification_metrics(gold, list(gold), LABELS)
    assert result["accuracy"] == 1.0
    assert result["macro_f1"] == 1.0
    assert result["n"] == 4 and result["correct"] == 4
    assert result["per_label"]["水果"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert result["confusion"]["matrix"] == [[2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]


@pytest.fixture
def mix() -> dict:
    # row:   0     1     2     3     4     5     6
    gold = ["水果", "水果", "水果", "水果", "衣服", "衣服", "酒店"]
    pred = ["水果", "水果", "水果", "衣服", "衣服", None, "水果"]
    return classification_metrics(gold, pred, LABELS)


def test_classification_known_mix(mix):
    # Correct: rows 0, 1, 2, 4 -> accuracy 4/7.
    # 水果: tp 3 (rows 0-2), predicted 4 times (rows 0-2, 6), gold 4 -> P 3/4, R 3/4, F1 3/4.
    # 衣服: tp 1 (row 4), predicted 2 times (rows 3, 4), gold 2 (row 5 unparsed) -> P 1/2, R 1/2, F1 1/2.
    # 酒店: tp 0, never predicted, gold 1 -> P 0 (zero division), R 0, F1 0.
    # macro-F1 = (3/4 + 1/2 + 0) / 3 = 5/12.
    assert mix["accuracy"] == pytest.approx(4 / 7)
    assert mix["macro_f1"] == pytest.approx(5 / 12)
    assert mix["correct"] == 4
    assert mix["per_label"] == {
        "水果": {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4},
        "衣服": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "酒店": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1},
    }


def test_classification_confusion_matrix(mix):
    confusion = mix["confusion"]
    assert confusion["labels"] == LABELS
    assert confusion["columns"] == [*LABELS, NONE_COLUMN]
    assert NONE_COLUMN == "(none)"
    # Rows gold, columns predicted; the unparsed row 5 (gold 衣服) lands in "(none)".
    assert confusion["matrix"] == [
        [3, 1, 0, 0],  # gold 水果: 3 right, row 3 -> 衣服
        [0, 1, 0, 1],  # gold 衣服: row 4 right, row 5 unparsed
        [1, 0, 0, 0],  # gold 酒店: row 6 -> 水果
    ]
    assert sum(map(sum, confusion["matrix"])) == 7


def test_classification_macro_f1_differs_from_accuracy_when_imbalanced():
    # 9 x A and 1 x B, the model always says A: accuracy 9/10.
    # A: tp 9, predicted 10, gold 9 -> P 9/10, R 1, F1 = 2 * 0.9 * 1 / 1.9 = 18/19.
    # B: tp 0, never predicted, gold 1 -> F1 0.  macro-F1 = (18/19 + 0) / 2 = 9/19 ~ 0.474.
    result = classification_metrics(["A"] * 9 + ["B"], ["A"] * 10, ["A", "B"])
    assert result["accuracy"] == pytest.approx(0.9)
    assert result["per_label"]["A"]["f1"] == pytest.approx(18 / 19)
    assert result["macro_f1"] == pytest.approx(9 / 19)


def test_classification_labels_absent_from_data_do_not_count_in_macro():
    # 酒店 and 蒙牛 occur nowhere: their entries are None and the macro is over 水果, 衣服 only.
    # 水果: P 1/1, R 1/2, F1 2/3.  衣服: tp 1, predicted 2, gold 1 -> P 1/2, R 1, F1 2/3.  macro 2/3.
    result = classification_metrics(["水果", "水果", "衣服"], ["水果", "衣服", "衣服"], [*LABELS, "蒙牛"])
    assert result["per_label"]["蒙牛"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert result["per_label"]["酒店"]["f1"] is None
    assert result["macro_f1"] == pytest.approx(2 / 3)


def test_classification_label_only_predicted_counts_in_macro():
    # 衣服 is predicted but never gold: P 0, R 0 (no gold), F1 0, and it pulls the macro down.
    # 水果: tp 1, predicted 1, gold 2 -> P 1, R 1/2, F1 2/3.  macro = (2/3 + 0) / 2 = 1/3.
    result = classification_metrics(["水果", "水果"], ["水果", "衣服"], LABELS)
    assert result["per_label"]["衣服"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert result["macro_f1"] == pytest.approx(1 / 3)


def test_classification_all_unparsed():
    result = classification_metrics(["水果", "衣服"], [None, None], LABELS)
    assert result["accuracy"] == 0.0
    assert result["macro_f1"] == 0.0
    assert result["confusion"]["matrix"] == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]]


def test_classification_gold_label_outside_label_set_gets_a_row():
    # A dev label the model was never trained on must appear, not vanish or crash.
    result = classification_metrics(["手机", "水果"], ["水果", "水果"], ["水果"])
    assert result["confusion"]["labels"] == ["水果", "手机"]
    assert result["confusion"]["matrix"] == [[1, 0, 0], [1, 0, 0]]
    assert result["per_label"]["手机"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert result["accuracy"] == 0.5


def test_classification_empty_input():
    result = classification_metrics([], [], LABELS)
    assert result["accuracy"] is None
    assert result["macro_f1"] is None
    assert result["n"] == 0
    assert result["confusion"]["matrix"] == [[0, 0, 0, 0]] * 3


def test_classification_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        classification_metrics(["水果", "衣服"], ["水果"], LABELS)


# --------------------------------------------------------------------------- triples


def t(subject: str, predicate: str, obj: str, subject_type: str = "s", object_type: str = "o") -> Triple:
    return Triple(subject, predicate, obj, subject_type, object_type)


def test_triples_perfect():
    gold = [[t("A", "主演", "B"), t("A", "导演", "C")], [t("D", "作者", "E")]]
    result = triple_metrics(gold, [list(row) for row in gold])
    assert (result["precision"], result["recall"], result["f1"]) == (1.0, 1.0, 1.0)
    assert (result["tp"], result["n_pred"], result["n_gold"], result["rows"]) == (3, 3, 3, 2)


def test_triples_known_mix():
    gold = [
        [t("A", "主演", "B"), t("A", "导演", "B"), t("A", "作者", "C")],
        [t("D", "作者", "E")],
    ]
    pred = [
        [t("A", "主演", "B"), t("A", "导演", "B", "别的类型", "别的类型"), t("A", "作者", "X")],
        [t("D", "作者", "E"), t("D", "主演", "E")],
    ]
    # Row 1: 主演 and 导演 match (types are not compared), A-作者-X does not -> tp 2, pred 3, gold 3.
    # Row 2: D-作者-E matches, D-主演-E does not -> tp 1, pred 2, gold 1.
    # Micro: tp 3, n_pred 5, n_gold 4 -> P 3/5, R 3/4, F1 = 2 * 0.6 * 0.75 / 1.35 = 2/3.
    result = triple_metrics(gold, pred)
    assert (result["tp"], result["n_pred"], result["n_gold"]) == (3, 5, 4)
    assert result["precision"] == pytest.approx(0.6)
    assert result["recall"] == pytest.approx(0.75)
    assert result["f1"] == pytest.approx(2 / 3)
    # 主演: tp 1 (row 1), pred 2 (row 1, row 2), gold 1 -> P 1/2, R 1, F1 2/3.
    # 导演: tp 1, pred 1, gold 1 -> 1, 1, 1.
    # 作者: tp 1 (row 2), pred 2 (A-作者-X, D-作者-E), gold 2 -> P 1/2, R 1/2, F1 1/2.
    per = result["per_predicate"]
    assert list(per) == sorted(["主演", "导演", "作者"])
    assert per["主演"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert per["导演"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert per["作者"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}


def test_triples_match_is_per_row():
    # The same triple predicted for the wrong row is not a hit.
    result = triple_metrics([[t("A", "主演", "B")], []], [[], [t("A", "主演", "B")]])
    assert (result["tp"], result["precision"], result["recall"], result["f1"]) == (0, 0.0, 0.0, 0.0)


def test_triples_duplicates_within_a_row_count_once():
    # Gold {A-主演-B}; predicted A-主演-B three times and X-主演-Y twice -> tp 1, pred 2, gold 1.
    # P 1/2, R 1, F1 2/3.
    gold = [[t("A", "主演", "B"), t("A", "主演", "B")]]
    pred = [[t("A", "主演", "B")] * 3 + [t("X", "主演", "Y")] * 2]
    result = triple_metrics(gold, pred)
    assert (result["tp"], result["n_pred"], result["n_gold"]) == (1, 2, 1)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["per_predicate"]["主演"]["support"] == 1


def test_triples_zero_predictions_give_zero_precision():
    result = triple_metrics([[t("A", "主演", "B")], [t("C", "作者", "D")]], [[], []])
    assert (result["precision"], result["recall"], result["f1"]) == (0.0, 0.0, 0.0)
    assert result["per_predicate"]["作者"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_triples_predictions_without_gold_give_zero():
    result = triple_metrics([[]], [[t("A", "主演", "B")]])
    assert (result["precision"], result["recall"], result["f1"]) == (0.0, 0.0, 0.0)
    assert result["per_predicate"]["主演"]["support"] == 0


@pytest.mark.parametrize(("gold", "pred"), [([], []), ([[], []], [[], []])])
def test_triples_nothing_to_evaluate_gives_none(gold, pred):
    result = triple_metrics(gold, pred)
    assert (result["precision"], result["recall"], result["f1"]) == (None, None, None)
    assert (result["tp"], result["n_pred"], result["n_gold"]) == (0, 0, 0)
    assert result["per_predicate"] == {}


def test_triples_length_mismatch_raises():
    with pytest.raises(ValueError, match="1 gold rows but 0 prediction rows"):
        triple_metrics([[]], [])
