"""Confidence from the model's token probabilities under the constraint (model.confidence)."""

import math

import pytest
import torch

from core.dataset import CLASSIFICATION, EXTRACTION, load_split
from model import confidence
from model.decoding import constrained_generate_scored
from model.grammar import TripleConstraint
from model.load import load_merged
from model.metrics import at_thresholds
from model.parsing import Triple, format_category, format_triples
from model.predict import answer_confidence, left_padded_batch, predict, prompt_ids, score_answer


@pytest.fixture(scope="module")
def lm(merged_model):
    return load_merged(merged_model)


@pytest.fixture(scope="module")
def dev(data_dir):
    return load_split(data_dir, "dev")


# ---------------------------------------------------------------- pure parts


def test_constrained_logprobs_are_a_distribution_over_the_allowed_tokens():
    logprobs = confidence.constrained_logprobs([2.0, 0.0, -1.0])
    assert sum(math.exp(x) for x in logprobs) == pytest.approx(1.0)
    assert logprobs[0] > logprobs[1] > logprobs[2]
    # Every allowed token banned by an earlier processor: uniform, as decoding then picks.
    assert confidence.constrained_logprobs([-math.inf, -math.inf]) == pytest.approx([math.log(0.5)] * 2)


def test_each_triple_gets_the_choices_from_after_the_previous_one_through_its_closing_brace():
    first, second = Triple("甲", "作者", "乙", "图书作品", "人物"), Triple("丙", "作者", "丁", "图书作品", "人物")
    answer = format_triples([first, second])
    offsets = [(i, i + 1) for i in range(len(answer))]  # one character per token
    opening, comma = answer.index("{"), answer.index("}, {") + 1
    choices = [(opening, math.log(0.5)), (answer.index("甲"), math.log(0.8)),  # the first triple
               (comma, math.log(0.4)), (answer.index("丁"), math.log(0.5)),  # the second, from its ','
               (answer.rindex("]"), math.log(0.1))]  # closing the list: no triple's
    scores = confidence.triple_confidences(answer, offsets, choices)
    assert scores == [(first.key(), pytest.approx(0.4)), (second.key(), pytest.approx(0.2))]
    assert confidence.triple_confidences("```json\n[]\n```", offsets, choices) == []
    assert confidence.category_confidence([(0, math.log(0.5)), (3, math.log(0.5))]) == pytest.approx(0.25)


def test_token_offsets_drop_the_dummy_prefix_space_as_decoding_does():
    assert confidence.token_offsets([" [", '"', "书"], lead=" ") == [(0, 1), (1, 2), (2, 3)]
    assert confidence.token_offsets(["[", None, "书"]) == [(0, 1), (1, 1), (1, 2)]


def test_metrics_at_thresholds_keep_only_confident_answers():
    gold = ["水果", "书籍", "酒店"]
    labels = [("水果", 0.9), ("水果", 0.4), (None, None)]
    t = Triple("甲", "作者", "乙")
    rows = at_thresholds((0.0, 0.5), gold, labels, [[t], [t]], [[Triple("甲", "作者", "乙", confidence=0.8)],
                                                               [Triple("丙", "作者", "乙", confidence=0.3)]],
                         [[Triple("丙", "作者", "乙", confidence=0.3)], []])
    assert rows[0] == {"threshold": 0.0, "cls_coverage": pytest.approx(2 / 3), "cls_precision": 0.5,
                       "cls_recall": pytest.approx(1 / 3), "triple_precision": 0.5, "triple_recall": 0.5,
                       "triple_f1": 0.5, "triples_kept": 2, "hallucination_rate": 0.5}
    assert rows[1]["cls_coverage"] == pytest.approx(1 / 3) and rows[1]["cls_precision"] == 1.0
    assert rows[1]["triple_precision"] == 1.0 and rows[1]["triples_kept"] == 1 and rows[1]["hallucination_rate"] == 0


# ---------------------------------------------------------------- on the trained tiny model


def test_confidence_is_a_probability_and_the_greedy_answer_beats_a_forced_wrong_one(lm, dev):
    texts = [ex.text for ex in dev if ex.task == CLASSIFICATION][:8]
    for pred in predict(lm, texts, tasks=(CLASSIFICATION,)):
        assert 0 < pred.category_confidence <= 1
        greedy_ids = lm.tokenizer.encode(format_category(pred.category), add_special_tokens=False)
        # Feeding the answer back gives the confidence decoding recorded for it.
        rescored = answer_confidence(lm, CLASSIFICATION, score_answer(lm, pred.text, CLASSIFICATION, greedy_ids))
        assert rescored == pytest.approx(pred.category_confidence, rel=1e-4)
        for wrong in [label for label in lm.schema["labels"] if label != pred.category]:
            ids = lm.tokenizer.encode(format_category(wrong), add_special_tokens=False)
            forced = answer_confidence(lm, CLASSIFICATION, score_answer(lm, pred.text, CLASSIFICATION, ids))
            assert 0 <= forced < pred.category_confidence, wrong


def test_triple_confidences_are_probabilities_and_a_forced_wrong_predicate_scores_lower(lm, dev):
    texts = sorted({ex.text for ex in dev if ex.task == EXTRACTION}, key=len)[:6]
    compared = 0
    for pred in predict(lm, texts, tasks=(EXTRACTION,)):
        assert all(0 < t.confidence <= 1 for t in pred.triples)
        if not pred.triples:
            continue
        greedy = pred.triples[0]
        for predicate, types in lm.schema["predicates"].items():
            if predicate == greedy.predicate:
                continue
            wrong = Triple(greedy.subject, predicate, greedy.object, types["subject_type"][0], types["object_type"][0])
            ids = lm.tokenizer.encode(format_triples([wrong]), add_special_tokens=False)
            (forced,) = answer_confidence(lm, EXTRACTION, score_answer(lm, pred.text, EXTRACTION, ids))
            assert forced < greedy.confidence, predicate
            compared += 1
            break
    assert compared, "no text got a triple: nothing compared"


def test_score_answer_refuses_an_answer_outside_the_constraint(lm, dev):
    text = next(ex.text for ex in dev if ex.task == CLASSIFICATION)
    with pytest.raises(ValueError, match="does not allow"):
        score_answer(lm, text, CLASSIFICATION, lm.tokenizer.encode('["不是标签"]', add_special_tokens=False))


def test_jump_forward_and_generate_record_the_same_confidences(lm, dev):
    texts = [ex.text for ex in dev if ex.task == EXTRACTION][:4]
    rows = [prompt_ids(lm, text, EXTRACTION) for text in texts]
    input_ids, mask, extra = left_padded_batch(lm, rows, lm.tokenizer.pad_token_id)
    runs = {}
    for jump in (True, False):
        constraints = [TripleConstraint(lm.schema, text) for text in texts]
        with torch.no_grad():
            runs[jump] = constrained_generate_scored(lm.model, lm.tokenizer, input_ids, mask, constraints, 128,
                                                     lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id,
                                                     jump_forward=jump, **extra)
    for fast, plain in zip(runs[True], runs[False], strict=True):
        assert fast.ids == plain.ids
        assert [i for i, _ in fast.choices] == [i for i, _ in plain.choices]
        assert [lp for _, lp in fast.choices] == pytest.approx([lp for _, lp in plain.choices], abs=1e-4)
    assert any(g.choices for g in runs[True])

