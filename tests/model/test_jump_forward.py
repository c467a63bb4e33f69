"""model.jump_forward: the same tokens as token-by-token constrained decoding in far fewer passes,
feed policies, random walks through the loop."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from core.dataset import (
    CLASSIFICATION,
    EXTRACTION,
)
from model.decoding import (
    constrained_generate,
)
from model.grammar import TripleConstraint
from model.jump_forward import DecodeStats, JumpForwardDecoder, feed_width
from model.matcher import row_matchers
from model.vocab import decode_answer, vocab_for
from tests.model.decoding_support import (
    RandomCausalLM,
    assert_category,
    assert_triples,
    both_ways,
    constraints_for,
    left_padded,
    random_llama,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("which", ["random", "trained"])
def test_jump_forward_equals_token_by_token_decoding(request, which, schema, dev_texts):
    """The char tokenizer spells each literal character with one token, so jump-forward must pick exactly the
    tokens of token-by-token constrained greedy decoding (fp32): same answers, in far fewer forward passes."""
    tokenizer, model = request.getfixturevalue("tiny" if which == "random" else "trained")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    for task, budgets in ((CLASSIFICATION, (2, 3, 5, 12)), (EXTRACTION, (3, 9, 25, 60, 300))):
        for max_new_tokens in budgets:
            old, new, old_passes, new_passes = both_ways(model, tokenizer, schema, dev_texts, task, max_new_tokens)
            assert new == old, (which, task, max_new_tokens)
            assert all(len(ids) <= max_new_tokens for ids in new)
            assert new_passes < old_passes or old_passes <= 1, (task, max_new_tokens, new_passes, old_passes)
            if task == EXTRACTION and max_new_tokens == 300:
                answers = [tokenizer.decode(ids) for ids in new]
                n_triples = sum(len(assert_triples(a, t, schema)) for a, t in zip(answers, dev_texts, strict=True))
                assert n_triples > 0 or which == "trained", "no triple: spans were not compared"
                assert new_passes * 3 < old_passes, (new_passes, old_passes)


@pytest.mark.parametrize("which", ["multichar", "sentencepiece"])
def test_jump_forward_with_multichar_tokens_is_well_formed_in_budget_and_batch_independent(
    request, which, schema, dev_texts
):
    """With multi-character tokens, literals are spelled with their cheapest split instead of being chosen token
    by token, so answers may differ from token-by-token decoding; they must still be valid and in budget."""
    tokenizer = request.getfixturevalue("multichar_tokenizer" if which == "multichar" else "sp_tokenizer")
    model = random_llama(tokenizer)
    vocab = vocab_for(tokenizer)
    end = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    for task, budgets in ((CLASSIFICATION, (2, 4, 12)), (EXTRACTION, (3, 5, 9, 17, 40, 300))):
        for max_new_tokens in budgets:
            old, new, old_passes, new_passes = both_ways(model, tokenizer, schema, dev_texts, task, max_new_tokens)
            assert new_passes <= old_passes
            for ids, text in zip(new, dev_texts, strict=True):
                answer = decode_answer(tokenizer, ids)
                assert answer == tokenizer.decode(ids)
                if len(ids) < max_new_tokens:  # ended within the budget: a whole answer
                    if task == CLASSIFICATION:
                        assert_category(answer, schema["labels"])
                    else:
                        assert_triples(answer, text, schema)
                else:  # only when even the shortest answer and the end token do not fit
                    assert len(ids) == max_new_tokens
                    automaton = constraints_for(schema, [text], task)[0].automaton(vocab)
                    assert max_new_tokens <= automaton.cost(automaton.initial())
        if task == EXTRACTION:
            # The literal pieces of the grammar go out as the vocabulary's long tokens.
            assert any(len(vocab.strings[i]) > 3 for ids in new for i in ids)
    # Rows are independent: one at a time gives the same tokens as the batch.
    texts = dev_texts[::5]
    input_ids, mask = left_padded(tokenizer, schema, texts, EXTRACTION)
    batched = constrained_generate(
        model, tokenizer, input_ids, mask, constraints_for(schema, texts, EXTRACTION), 200, end, pad
    )
    for text, ids in zip(texts, batched, strict=True):
        one_ids, one_mask = left_padded(tokenizer, schema, [text], EXTRACTION)
        single = constrained_generate(
            model, tokenizer, one_ids, one_mask, constraints_for(schema, [text], EXTRACTION), 200, end, pad
        )
        assert single == [ids]


def test_feed_width_policies():
    assert feed_width([1, 60, 15, 1], "all") == 60
    assert feed_width([1, 60, 15, 1], "median") == 1  # the lower median: half the rows feed their whole queue
    assert feed_width([3, 60, 15], "median") == 15
    assert feed_width([7], "median") == feed_width([7], "all") == 7
    with pytest.raises(ValueError, match="feed must be one of"):
        JumpForwardDecoder(None, [], 0, feed="longest")


@pytest.mark.parametrize("which", ["random", "trained"])
def test_median_feed_gives_the_same_tokens_with_far_less_padding(request, which, schema, dev_texts):
    """Feeding at most the median queue per pass changes how tokens are grouped into passes, never which
    tokens are chosen: the same answers as feeding whole runs, with far fewer pads fed."""
    tokenizer, model = request.getfixturevalue("tiny" if which == "random" else "trained")
    end = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    totals = {"all": Counter(), "median": Counter()}
    texts = sorted(dev_texts, key=len)
    for start in range(0, len(texts), 8):
        chunk = texts[start : start + 8]
        input_ids, mask = left_padded(tokenizer, schema, chunk, EXTRACTION)
        answers = {}
        for feed in ("all", "median"):
            matchers = row_matchers(tokenizer, constraints_for(schema, chunk, EXTRACTION), 128, end)
            stats = DecodeStats()
            decoder = JumpForwardDecoder(model, matchers, pad, prefix_cache=False, feed=feed, stats=stats)
            answers[feed] = decoder.run(input_ids, mask)
            totals[feed].update(fed=stats.fed, padding=stats.padding, passes=stats.passes)
        assert answers["median"] == answers["all"], start
    real = totals["all"]["fed"] - totals["all"]["padding"]
    assert real == totals["median"]["fed"] - totals["median"]["padding"] > 0
    assert totals["median"]["passes"] >= totals["all"]["passes"]
    assert totals["median"]["padding"] * 2 <= totals["all"]["padding"], totals
    if which == "random":  # its rows write triples of different shapes, so whole runs are out of step
        assert totals["all"]["padding"] > real / 10, totals
    # "auto" is the median on a CPU and whole runs on an accelerator, where a pass costs about the same either way.
    decoder = JumpForwardDecoder(model, [], pad)
    assert decoder._policy(torch.device("cpu")) == "median" and decoder._policy(torch.device("cuda")) == "all"


@pytest.mark.parametrize("max_new_tokens", [3, 5, 9, 17, 40, 120, 400])
def test_jump_forward_random_walks_are_well_formed_and_in_budget(
    multichar_tokenizer, sp_tokenizer, schema, dev_texts, max_new_tokens
):
    """Random logits take the loop through every grammar path (spans, caps, closing early, budget moves)."""
    for seed, tokenizer in enumerate((multichar_tokenizer, sp_tokenizer)):
        end = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
        for task in (CLASSIFICATION, EXTRACTION):
            input_ids, mask = left_padded(tokenizer, schema, dev_texts, task)
            model = RandomCausalLM(len(tokenizer), seed=max_new_tokens + seed)
            answers = constrained_generate(
                model, tokenizer, input_ids, mask, constraints_for(schema, dev_texts, task), max_new_tokens, end, pad
            )
            assert model.passes <= max_new_tokens
            vocab = vocab_for(tokenizer)
            n_triples = 0
            for ids, text in zip(answers, dev_texts, strict=True):
                answer = decode_answer(tokenizer, ids)
                assert answer == tokenizer.decode(ids) and end not in ids
                automaton = constraints_for(schema, [text], task)[0].automaton(vocab)
                if len(ids) == max_new_tokens:  # cut: only when even the shortest answer does not fit
                    assert max_new_tokens <= automaton.cost(automaton.initial())
                    assert automaton.is_prefix(answer)
                elif task == CLASSIFICATION:
                    assert_category(answer, schema["labels"])
                else:
                    n_triples += len(assert_triples(answer, text, schema))
            # At 40 tokens a walk that spells the fence char by char ('▁', '`', '`', ...) may have no room left
            # for a triple; with 120 some row always opens one.
            if task == EXTRACTION and max_new_tokens >= 120:
                assert n_triples > 0, "the walks never opened a triple: the test would not exercise the grammar"


def test_jump_forward_keeps_the_repeat_ban_and_the_cap(tiny):
    tokenizer, _ = tiny
    schema = {"predicates": {"p": {"subject_type": ["s"], "object_type": ["o"]}}}
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for text, max_triples in (("甲", 16), ("甲乙", 16), ("甲乙丙丁", 3)):
        constraints = [TripleConstraint(schema, text, max_triples=max_triples) for _ in range(16)]
        input_ids = torch.full((16, 4), pad)
        input_ids[:, -1] = tokenizer.bos_token_id
        mask = (input_ids != pad).long()
        model = RandomCausalLM(len(tokenizer), seed=len(text))
        answers = constrained_generate(model, tokenizer, input_ids, mask, constraints, 900, end, pad)
        counts = [len(assert_triples(tokenizer.decode(ids), text, schema, max_triples)) for ids in answers]
        possible = (len(text) * (len(text) + 1) // 2) ** 2
        assert max(counts) <= min(possible, max_triples) and max(counts) >= 1
