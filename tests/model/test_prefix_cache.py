"""model.prefix_cache: the shared prompt prefix run once and reused across batches and calls, answers
unchanged; edge cases and a model changed in place."""

from __future__ import annotations

import copy

import pytest
import torch

from core.dataset import (
    CLASSIFICATION,
    EXTRACTION,
)
from model.jump_forward import DecodeStats, JumpForwardDecoder
from model.matcher import row_matchers
from model.prefix_cache import PREFIX_CACHE
from tests.model.decoding_support import (
    constraints_for,
    left_padded,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return input_ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])


PREFIX_STATS = DecodeStats()  # prefixes run and reused, over every _jump call


def _jump(model, tokenizer, input_ids, mask, constraints, max_new_tokens, prefix_cache) -> tuple[list, int]:
    """Jump-forward answers and the prompt tokens the first pass took from the prefix cache."""
    end = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    matchers = row_matchers(tokenizer, constraints, max_new_tokens, end)
    PREFIX_STATS.prefix_length = 0
    decoder = JumpForwardDecoder(model, matchers, pad, prefix_cache=prefix_cache, stats=PREFIX_STATS)
    answers = decoder.run(input_ids, mask)
    return answers, PREFIX_STATS.prefix_length


@pytest.mark.parametrize("which", ["random", "trained"])
def test_shared_prefix_cache_gives_the_same_tokens(request, which, schema, dev_texts):
    """predict()'s batches of 8, both tasks: the prefix is run once, reused across calls, answers unchanged (fp32)."""
    tokenizer, model = request.getfixturevalue("tiny" if which == "random" else "trained")
    PREFIX_CACHE.clear()
    runs, hits = PREFIX_STATS.prefix_runs, PREFIX_STATS.prefix_hits
    calls = 0
    for task, max_new_tokens in ((CLASSIFICATION, 7), (EXTRACTION, 128), (CLASSIFICATION, 3)):
        texts = sorted(dev_texts, key=len)
        for start in range(0, len(texts), 8):
            chunk = texts[start : start + 8]
            input_ids, mask = left_padded(tokenizer, schema, chunk, task)
            plain, none = _jump(
                model, tokenizer, input_ids, mask, constraints_for(schema, chunk, task), max_new_tokens, False
            )
            cached, length = _jump(
                model, tokenizer, input_ids, mask, constraints_for(schema, chunk, task), max_new_tokens, True
            )
            assert none == 0 and length > 40, length  # the instruction and the phrasing at least
            assert cached == plain, (which, task, max_new_tokens, start)
            calls += 1
    # A pass of its own for a few prefixes (each task's, the part both share), cached for the other calls.
    assert PREFIX_STATS.prefix_runs - runs <= 5 and PREFIX_STATS.prefix_hits - hits >= calls - 5
    # A single comment reuses its task's cached prefix.
    input_ids, mask = left_padded(tokenizer, schema, dev_texts[:1], EXTRACTION)
    runs = PREFIX_STATS.prefix_runs
    one = dev_texts[:1]
    plain, _ = _jump(model, tokenizer, input_ids, mask, constraints_for(schema, one, EXTRACTION), 128, False)
    cached, length = _jump(model, tokenizer, input_ids, mask, constraints_for(schema, one, EXTRACTION), 128, True)
    assert cached == plain and length > 40 and PREFIX_STATS.prefix_runs == runs


def test_shared_prefix_edge_cases_give_the_same_tokens(tiny, schema, dev_texts):
    """Rows that share nothing, rows whose prompt is the whole shared prefix, identical rows, a model changed
    in place: the same answers as without the cache."""
    tokenizer, model = tiny
    pad = tokenizer.pad_token_id
    prompts = [
        r[r.ne(pad).nonzero()[0, 0] :].tolist() for r in left_padded(tokenizer, schema, dev_texts[:4], EXTRACTION)[0]
    ]
    whole = prompts[0]
    cases = {
        "no shared prefix": [whole, whole[1:], whole[2:12]],
        "a prompt is the shared prefix": [whole[:50], whole, whole[:50] + whole[60:70]],
        "identical rows": [whole, whole, whole],
        "one row": [whole],
        "mixed lengths": prompts,
    }
    PREFIX_CACHE.clear()
    for name, rows in cases.items():
        for task, max_new_tokens in ((CLASSIFICATION, 7), (EXTRACTION, 150)):
            texts = [dev_texts[0]] * len(rows)
            input_ids, mask = _padded(rows, pad)
            plain, _ = _jump(
                model, tokenizer, input_ids, mask, constraints_for(schema, texts, task), max_new_tokens, False
            )
            cached, length = _jump(
                model, tokenizer, input_ids, mask, constraints_for(schema, texts, task), max_new_tokens, True
            )
            assert cached == plain, (name, task)
            assert length < min(len(r) for r in rows), name  # every row feeds a token of its own
            if name == "no shared prefix":
                assert length == 0
    # The cached prefix of a model is not used once its weights change in place, nor for another model.
    other = copy.deepcopy(model)
    input_ids, mask = left_padded(tokenizer, schema, dev_texts[:8], CLASSIFICATION)
    texts = dev_texts[:8]
    before, _ = _jump(other, tokenizer, input_ids, mask, constraints_for(schema, texts, CLASSIFICATION), 7, True)
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(-1.5)
    plain, _ = _jump(other, tokenizer, input_ids, mask, constraints_for(schema, texts, CLASSIFICATION), 7, False)
    runs = PREFIX_STATS.prefix_runs
    cached, length = _jump(other, tokenizer, input_ids, mask, constraints_for(schema, texts, CLASSIFICATION), 7, True)
    assert cached == plain and length > 0 and PREFIX_STATS.prefix_runs == runs + 1
