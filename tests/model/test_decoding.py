"""model.decoding: generation with a tiny RANDOM model, whose answers must still be well-formed, in budget
and batch-independent; which models keep HF generate()."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from core.dataset import (
    CLASSIFICATION,
    EXTRACTION,
)
from model.decoding import (
    GrammarLogitsProcessor,
    constrained_generate,
    jump_forward_unsupported,
    unconstrained_generate,
)
from model.grammar import CategoryConstraint, TripleConstraint
from tests.model.decoding_support import (
    assert_category,
    assert_triples,
    constraints_for,
    counting_passes,
    left_padded,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("max_new_tokens", [25, 60, 300])
def test_tiny_model_answers_are_well_formed_within_the_budget(tiny, schema, dev_texts, max_new_tokens):
    tokenizer, model = tiny
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    input_ids, mask = left_padded(tokenizer, schema, dev_texts, CLASSIFICATION)
    constraints = [CategoryConstraint(schema["labels"])] * len(dev_texts)
    for ids in constrained_generate(model, tokenizer, input_ids, mask, constraints, max_new_tokens, end, pad):
        assert len(ids) < max_new_tokens  # so the end token was generated within the budget
        assert_category(tokenizer.decode(ids), schema["labels"])

    input_ids, mask = left_padded(tokenizer, schema, dev_texts, EXTRACTION)
    constraints = [TripleConstraint(schema, text) for text in dev_texts]
    n_triples = 0
    for ids, text in zip(
        constrained_generate(model, tokenizer, input_ids, mask, constraints, max_new_tokens, end, pad),
        dev_texts,
        strict=True,
    ):
        assert len(ids) < max_new_tokens
        n_triples += len(assert_triples(tokenizer.decode(ids), text, schema))
    if max_new_tokens == 300:
        assert n_triples > 0, "no triple at all: the test would not exercise the span grammar"


def test_batched_results_equal_one_at_a_time(tiny, schema, dev_texts):
    tokenizer, model = tiny
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    texts = dev_texts[::4]  # 5 texts, short to long: heavy left padding
    batched_answers = []
    for task, max_new_tokens in ((CLASSIFICATION, 12), (EXTRACTION, 240)):
        if task == CLASSIFICATION:
            make = lambda text: CategoryConstraint(schema["labels"])
        else:
            make = lambda text: TripleConstraint(schema, text)
        input_ids, mask = left_padded(tokenizer, schema, texts, task)
        constraints = [make(t) for t in texts]
        batched = constrained_generate(model, tokenizer, input_ids, mask, constraints, max_new_tokens, end, pad)
        for text, ids in zip(texts, batched, strict=True):
            one_ids, one_mask = left_padded(tokenizer, schema, [text], task)
            single = constrained_generate(model, tokenizer, one_ids, one_mask, [make(text)], max_new_tokens, end, pad)
            assert single == [ids], (task, text)
        batched_answers += [tokenizer.decode(ids) for ids in batched]
    assert any('"subject": "' in answer for answer in batched_answers), "no triple: spans were not compared"


def test_unconstrained_generate_is_the_same_call_without_the_mask(tiny, schema, dev_texts):
    tokenizer, model = tiny
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    input_ids, mask = left_padded(tokenizer, schema, dev_texts[:6], CLASSIFICATION)
    free = unconstrained_generate(model, tokenizer, input_ids, mask, 12, end, pad)
    assert len(free) == 6 and all(len(ids) <= 12 and end not in ids and pad not in ids for ids in free)
    labels = {json.dumps([label], ensure_ascii=False) for label in schema["labels"]}
    # The random model babbles without constraints; with them, the same model only says labels.
    assert any(tokenizer.decode(ids) not in labels for ids in free)


class _StubChatGLM(torch.nn.Module):
    """Stands in for ChatGLM-6B: its generate() records the call and answers '["' + end."""

    def __init__(self, tokenizer):
        super().__init__()
        self.config = type("Config", (), {"model_type": "chatglm", "is_encoder_decoder": False})()
        self.tokenizer = tokenizer
        self.calls = []

    def generate(self, input_ids, **kwargs):
        self.calls.append(kwargs)
        new = self.tokenizer.convert_tokens_to_ids(["[", '"', self.tokenizer.eos_token])
        return torch.cat([input_ids, torch.tensor([new] * input_ids.shape[0])], dim=1)


def test_chatglm_and_generate_options_keep_hf_generate(tiny, schema, dev_texts):
    tokenizer, model = tiny
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    input_ids, mask = left_padded(tokenizer, schema, dev_texts[:3], CLASSIFICATION)
    constraints = constraints_for(schema, dev_texts[:3], CLASSIFICATION)
    glm = _StubChatGLM(tokenizer)
    assert "ChatGLM" in jump_forward_unsupported(glm)
    answers = constrained_generate(glm, tokenizer, input_ids, mask, constraints, 12, end, pad)
    assert len(glm.calls) == 1 and isinstance(glm.calls[0]["logits_processor"][0], GrammarLogitsProcessor)
    assert [tokenizer.decode(ids) for ids in answers] == ['["'] * 3
    with pytest.raises(ValueError, match="ChatGLM"):
        constrained_generate(glm, tokenizer, input_ids, mask, constraints, 12, end, pad, jump_forward=True)

    assert jump_forward_unsupported(model) is None
    # Options only generate() understands, passed or in the model's generation_config, keep generate().
    with counting_passes(model) as calls:
        constrained_generate(model, tokenizer, input_ids, mask, constraints, 12, end, pad, output_scores=False)
    assert calls[0] > 1  # one pass per token: '[', '"', the label... (jump-forward needs one here)
    with pytest.raises(ValueError, match="generate"):
        constrained_generate(model, tokenizer, input_ids, mask, constraints, 12, end, pad, jump_forward=True, top_k=3)
    saved = model.generation_config
    model.generation_config = copy.deepcopy(saved)
    try:
        model.generation_config.repetition_penalty = 1.3
        assert "repetition_penalty" in jump_forward_unsupported(model)
    finally:
        model.generation_config = saved
