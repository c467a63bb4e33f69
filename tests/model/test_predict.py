"""Prediction on the tiny merged model: always well-formed with constraints, batch-independent."""

import pytest

from finetune.data import CLASSIFICATION, EXTRACTION, load_split
from model.load import load_merged
from model.predict import predict


@pytest.fixture(scope="module")
def lm(merged_model):
    return load_merged(merged_model)


@pytest.fixture(scope="module")
def texts(data_dir):
    dev = load_split(data_dir, "dev")
    cls = [ex.text for ex in dev if ex.task == CLASSIFICATION][:6]
    ie = [ex.text for ex in dev if ex.task == EXTRACTION][:6]
    return cls + ie


def test_batched_equals_one_at_a_time_for_both_tasks(lm, texts):
    batched = predict(lm, texts, batch_size=8)
    single = [predict(lm, [t], batch_size=1)[0] for t in texts]
    for b, s in zip(batched, single, strict=True):
        assert b.raw == s.raw
        assert b.category == s.category and b.triples == s.triples


def test_constrained_answers_are_well_formed_and_grounded(lm, texts):
    for pred in predict(lm, texts, batch_size=4):
        assert pred.error is None
        assert pred.category in lm.schema["labels"]
        assert pred.well_formed == {CLASSIFICATION: True, EXTRACTION: True}
        assert pred.hit_limit == {CLASSIFICATION: False, EXTRACTION: False}
        for triple in pred.triples:
            assert triple.subject in pred.text and triple.object in pred.text
            assert triple.predicate in lm.schema["predicates"]
        assert len(pred.triples) <= lm.schema["max_triples"]


def test_empty_and_long_texts_never_raise(lm):
    preds = predict(lm, ["", "   ", None, "好" * 3000], tasks=(CLASSIFICATION,))
    assert [p.error for p in preds] == ["empty text", "empty text", "empty text", None]
    assert preds[3].category in lm.schema["labels"]
    assert any("cut" in w for w in preds[3].warnings)
