"""model.matcher through GrammarLogitsProcessor with random logits: every walk well-formed and in budget,
the processor only masks, the budget's closing moves, teacher-forced gold answers."""

from __future__ import annotations

import pytest
import torch

from core.dataset import (
    JSON_FENCE_CLOSE,
)
from model.decoding import (
    grammar_processor,
)
from model.grammar import CategoryConstraint, TripleConstraint
from model.matcher import row_matchers
from model.vocab import decode_answer, vocab_for
from tests.model.decoding_support import (
    EMPTY_TRIPLES,
    TEXT,
    answer_of,
    assert_category,
    assert_triples,
    random_walk,
    triple,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("max_new_tokens", [3, 5, 9, 17, 40, 120, 400])
def test_random_walks_with_multichar_tokens_are_well_formed_and_in_budget(
    multichar_tokenizer, schema, dev_texts, max_new_tokens
):
    vocab = vocab_for(multichar_tokenizer)
    constraints = [TripleConstraint(schema, text) for text in dev_texts]
    answers, _ = random_walk(multichar_tokenizer, constraints, max_new_tokens, seed=max_new_tokens)
    n_triples = 0
    for ids, text in zip(answers, dev_texts, strict=True):
        answer = multichar_tokenizer.decode(ids)
        assert answer == vocab.decode(ids)
        n_triples += len(assert_triples(answer, text, schema))
    if max_new_tokens >= 40:
        assert n_triples > 0, "the walks never opened a triple: the test would not exercise the grammar"
        assert any(len(vocab.strings[i]) > 1 for ids in answers for i in ids), "no multi-character token used"
    if max_new_tokens == 3:  # exactly enough for '```json\n[' + ']\n```' + end
        assert all(multichar_tokenizer.decode(ids) == EMPTY_TRIPLES for ids in answers)

    categories, _ = random_walk(multichar_tokenizer, [CategoryConstraint(schema["labels"])] * 8, 4, seed=1)
    for ids in categories:
        assert_category(multichar_tokenizer.decode(ids), schema["labels"])


def test_random_walks_with_a_sentencepiece_tokenizer(sp_tokenizer, schema, dev_texts):
    vocab = vocab_for(sp_tokenizer)
    constraints = [TripleConstraint(schema, text) for text in dev_texts]
    answers, _ = random_walk(sp_tokenizer, constraints, 150, seed=0)
    for ids, text in zip(answers, dev_texts, strict=True):
        assert_triples(sp_tokenizer.decode(ids), text, schema)
        assert decode_answer(sp_tokenizer, ids) == sp_tokenizer.decode(ids)
    categories, _ = random_walk(sp_tokenizer, [CategoryConstraint(schema["labels"])] * 12, 12, seed=0)
    for ids in categories:
        assert_category(sp_tokenizer.decode(ids), schema["labels"])
        assert decode_answer(sp_tokenizer, ids) == sp_tokenizer.decode(ids)
    # Both ways to start were taken: with sentencepiece's leading '▁' (as in training) and without it.
    starts = {vocab.strings[ids[0]].startswith(" ") for ids in answers + categories}
    assert starts == {True, False}


def test_repeat_ban_and_cap_hold_in_long_random_walks(tiny):
    tokenizer, _ = tiny
    schema = {"predicates": {"p": {"subject_type": ["s"], "object_type": ["o"]}}}
    for text, max_triples in (("甲", 16), ("甲乙", 16), ("甲乙丙丁", 3)):
        constraints = [TripleConstraint(schema, text, max_triples=max_triples)] * 16
        answers, _ = random_walk(tokenizer, constraints, 900, seed=len(text))
        counts = [len(assert_triples(tokenizer.decode(ids), text, schema, max_triples)) for ids in answers]
        possible = (len(text) * (len(text) + 1) // 2) ** 2  # distinct (object, subject) pairs
        assert max(counts) <= min(possible, max_triples) and max(counts) >= 1


def test_processor_only_masks_and_survives_all_minus_inf_logits(tiny, schema):
    tokenizer, _ = tiny
    end = tokenizer.eos_token_id
    processor = grammar_processor(tokenizer, [CategoryConstraint(schema["labels"])] * 2, 4, 10, end)
    input_ids = torch.zeros((2, 4), dtype=torch.long)
    scores = torch.randn(2, len(tokenizer))
    out = processor(input_ids, scores.clone())
    allowed = torch.isfinite(out)
    assert allowed.sum(dim=1).tolist() == [1, 1]  # every label starts with '['
    assert torch.equal(out[allowed], scores[allowed])
    # Another processor may have banned every allowed token: the row must still pick an allowed one.
    processor = grammar_processor(tokenizer, [CategoryConstraint(schema["labels"])] * 2, 4, 10, end)
    out = processor(input_ids, torch.full((2, len(tokenizer)), -float("inf")))
    assert tokenizer.convert_ids_to_tokens(out.argmax(dim=-1).tolist()) == ["[", "["]
    with pytest.raises(ValueError, match="constraints"):
        processor(torch.zeros((3, 4), dtype=torch.long), torch.zeros(3, len(tokenizer)))


def _allowed_strings(tokenizer, constraint, prefix: str, tokens_left: int) -> set[str]:
    """Token strings the processor allows after `prefix` was generated, with `tokens_left` new tokens to go."""
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * 2 + prefix_ids])
    end = tokenizer.eos_token_id
    processor = grammar_processor(tokenizer, [constraint], 2, len(prefix_ids) + tokens_left, end)
    out = processor(input_ids, torch.zeros(1, len(tokenizer)))
    return {tokenizer.convert_ids_to_tokens(i) for i in torch.isfinite(out[0]).nonzero()[:, 0].tolist()}


def test_near_the_budget_only_closing_moves_are_allowed(tiny, schema):
    tokenizer, _ = tiny
    constraint = TripleConstraint(schema, TEXT)
    in_object = answer_of(triple())[: -len('驰", "subject": "喜剧之王"}]' + JSON_FENCE_CLOSE)]  # ... "object": "周星
    to_close = len('", "subject": "喜"}]' + JSON_FENCE_CLOSE)  # shortest way out, in characters = tokens here
    assert _allowed_strings(tokenizer, constraint, in_object, to_close + 1) == {'"'}  # +1: the end token
    assert _allowed_strings(tokenizer, constraint, in_object, to_close + 2) == {'"', "驰"}
    after_one = answer_of(triple())[: -len("]" + JSON_FENCE_CLOSE)]
    assert _allowed_strings(tokenizer, constraint, after_one, 200) == {"]", ","}
    assert _allowed_strings(tokenizer, constraint, after_one, 60) == {"]"}  # no room for another triple
    assert _allowed_strings(tokenizer, constraint, answer_of(triple()), 3) == {tokenizer.eos_token}


def test_budget_below_the_shortest_answer_still_moves_towards_it(tiny, schema):
    tokenizer, _ = tiny
    automaton = CategoryConstraint(schema["labels"]).automaton()
    end = tokenizer.eos_token_id
    processor = grammar_processor(tokenizer, [CategoryConstraint(schema["labels"])], 1, 3, end)
    input_ids = torch.zeros((1, 1), dtype=torch.long)
    for _ in range(3):
        chosen = processor(input_ids, torch.randn(1, len(tokenizer))).argmax(dim=-1)
        input_ids = torch.cat([input_ids, chosen[:, None]], dim=1)
    answer = input_ids[0, 1:].tolist()
    # 3 tokens cannot hold '["书"]' + end: the row is cut, but what it wrote is a valid start.
    assert len(answer) == 3 and end not in answer
    assert automaton.is_prefix(tokenizer.decode(answer))


@pytest.mark.parametrize("obj, subject", [("I Do Believe", "喜剧之王"), ("周星驰", "I Do Believe")],
                         ids=["object", "subject"])
def test_a_span_with_an_inner_space_is_produced_whole(tiny, schema, obj, subject):
    """Teacher-forced through the processor, as decoding sees it: the gold tokens of an object (or a
    subject: its own cost rule) with an inner space are all allowed, and the budget still lets it close."""
    tokenizer, _ = tiny
    text = "《喜剧之王》的主题曲是I Do Believe，周星驰主演"
    answer = answer_of(triple(obj=obj, subject=subject))
    ids = tokenizer.encode(answer, add_special_tokens=False)
    end = tokenizer.eos_token_id
    proc = grammar_processor(tokenizer, [TripleConstraint(schema, text)], 1, len(ids) + 1, end)
    seq = [0]
    for token in ids + [end]:
        masked = proc(torch.tensor([seq]), torch.zeros(1, len(tokenizer)))
        assert not torch.isneginf(masked[0, token]), f"{tokenizer.decode(seq[1:])!r} + {tokenizer.decode([token])!r}"
        seq.append(token)
    assert decode_answer(tokenizer, seq[1:]) == answer


def test_the_matcher_runs_forced_tokens_and_waits_on_real_choices(tiny, schema):
    """One label left: run_forced spells it and the row is done; several: it stops where they part and waits on
    exactly the tokens allowed() lists; a token from elsewhere is spelled through the automaton; the end token
    finishes the row."""
    tokenizer, _ = tiny
    end = tokenizer.eos_token_id
    (only,) = row_matchers(tokenizer, [CategoryConstraint(["水果"])], 10, end)
    assert only.run_forced() is False and only.done
    assert tokenizer.decode(only.tokens) == '["水果"]' and only.choices == []

    (row,) = row_matchers(tokenizer, [CategoryConstraint(["水果", "水杯"])], 10, end)
    assert row.run_forced() is True and tokenizer.decode(row.tokens) == '["水'
    waiting = {tokenizer.decode([t]) for t in row.waiting_on}
    assert waiting == {"果", "杯"} and set(row.waiting_on) == set(row.allowed())
    row.accept(tokenizer.convert_tokens_to_ids("杯"), -0.5)
    assert row.choices == [(len(row.tokens) - 1, -0.5)]
    assert row.run_forced() is False and tokenizer.decode(row.tokens) == '["水杯"]'

    (free,) = row_matchers(tokenizer, [CategoryConstraint(["水果", "水杯"])], 10, end)
    free.accept(tokenizer.convert_tokens_to_ids("["))  # not from allowed(): fed through the automaton
    assert not free.done and free.allowed() and all(tokenizer.decode([t]) == '"' for t in free.allowed())
    free.accept(tokenizer.convert_tokens_to_ids("书"))  # no way on from here
    assert free.done
    (ended,) = row_matchers(tokenizer, [CategoryConstraint(["水果"])], 10, end)
    ended.accept(end)
    assert ended.done and ended.tokens == []
