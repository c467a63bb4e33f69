"""Prediction on the tiny merged model: always well-formed with constraints, batch-independent."""

import pytest

from core.dataset import CLASSIFICATION, EXTRACTION, load_split
from model.load import load_merged
from model.predict import predict
from model.prompts import build_prompt


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


def test_the_triple_constraint_reads_only_text_the_model_read(lm, texts, monkeypatch):
    """A prompt over max_source_len is cut in the middle exactly as training cuts it, and the triple constraint
    is given the start of the text that lies inside the head the cut keeps: the decoder copies no span from
    words the model never saw, and the model still sees the prompt it was trained on."""
    from core.dataset import truncate_prompt
    from model import grammar, vocab
    from model.predict import prompt_ids, seen_text

    def prompt_tokens(text):
        return len(lm.tokenizer.encode(build_prompt(lm.schema, text, EXTRACTION), add_special_tokens=False))

    limit = lm.schema["max_source_len"]
    long_text = "".join(ch for ch in "".join(texts[6:]) * 10 if not ch.isspace())[:1900]
    assert prompt_tokens(long_text) > limit
    seen = seen_text(lm, long_text, EXTRACTION)
    assert long_text.startswith(seen) and 0 < len(seen) < len(long_text)
    full = lm.tokenizer.encode(build_prompt(lm.schema, long_text, EXTRACTION), add_special_tokens=False)
    assert prompt_ids(lm, long_text, EXTRACTION) == lm.family.build_generation_ids(
        lm.tokenizer, truncate_prompt(full, limit))  # the training cut, prompt unchanged
    head = lm.tokenizer.decode(truncate_prompt(full, limit)[: limit - min(16, limit // 4)])
    assert seen in head and long_text[: len(seen) + 40] not in head
    assert seen_text(lm, texts[6], EXTRACTION) == texts[6]  # a prompt that fits is not touched

    given = []

    class Recording(grammar.TripleConstraint):
        def __init__(self, schema, text, **kwargs):
            given.append(text)
            super().__init__(schema, text, **kwargs)

    monkeypatch.setattr(grammar, "TripleConstraint", Recording)
    pred = predict(lm, [long_text, texts[6]], tasks=(EXTRACTION,), batch_size=2)
    assert sorted(given) == sorted(vocab.text_view(lm.tokenizer, t) for t in (seen, texts[6]))
    assert f"extraction: the prompt allows {limit} tokens, so triples come from the first {len(seen)} of " \
           f"{len(long_text)} characters" in pred[0].warnings
    assert not any("come from the first" in w for w in pred[1].warnings)
    assert all(t.subject in seen and t.object in seen for t in pred[0].triples)


def test_chatglm_batches_use_the_tokenizers_own_masks_and_positions():
    """ChatGLM-6B v1 drops a 0/1 mask and would attend to pads: its tokenizer's pad() builds the 4D
    mask and 2D positions, and predict passes both on (tested with a double of that tokenizer)."""
    import torch

    from core.families import CAUSAL, CHATGLM
    from model.predict import left_padded_batch

    class PaddingDouble:
        def pad(self, encoded, padding, return_tensors):
            rows = encoded["input_ids"]
            longest = max(map(len, rows))
            ids = torch.tensor([[3] * (longest - len(r)) + r for r in rows])
            return {"input_ids": ids, "attention_mask": torch.zeros(len(rows), 1, longest, longest, dtype=torch.bool),
                    "position_ids": torch.zeros(len(rows), 2, longest, dtype=torch.long)}

    class Lm:
        device, tokenizer = "cpu", PaddingDouble()

    lm = Lm()
    lm.family = CHATGLM
    ids, mask, extra = left_padded_batch(lm, [[5, 6, 7], [8]], pad_id=3)
    assert ids.tolist() == [[5, 6, 7], [3, 3, 8]]
    assert mask.shape == (2, 1, 3, 3) and mask.dtype == torch.bool
    assert extra["position_ids"].shape == (2, 2, 3)
    lm.family = CAUSAL
    ids, mask, extra = left_padded_batch(lm, [[5, 6, 7], [8]], pad_id=0)
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]] and extra == {}
