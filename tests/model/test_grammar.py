"""model.grammar: the category and triple automata on plain strings (what they accept, cost, cap, ban),
and the schema part built once per schema and vocabulary."""

from __future__ import annotations

import json

import pytest

from core.dataset import (
    EXTRACTION,
    JSON_FENCE_CLOSE,
    JSON_FENCE_OPEN,
)
from model.grammar import CategoryConstraint, TripleConstraint
from model.vocab import vocab_for
from tests.model.decoding_support import (
    EMPTY_TRIPLES,
    TEXT,
    answer_of,
    triple,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_category_automaton_accepts_exactly_the_labels(schema):
    automaton = CategoryConstraint(schema["labels"]).automaton()
    for label in schema["labels"]:
        answer = json.dumps([label], ensure_ascii=False)
        assert automaton.accepts(answer)
        assert all(automaton.is_prefix(answer[:i]) for i in range(len(answer)))
    bad_answers = ['["水"]', '["水果" ]', '["水果"]\n', '["水果", "衣服"]', "水果", "[“水果”]", '["x"]', ' ["水果"]']
    for bad in bad_answers:
        assert not automaton.accepts(bad), bad
    assert not automaton.is_prefix('["x') and not automaton.is_prefix("{")


def test_category_labels_that_are_prefixes_of_each_other():
    automaton = CategoryConstraint(["书", "书籍"]).automaton()
    assert automaton.accepts('["书"]') and automaton.accepts('["书籍"]')
    assert not automaton.accepts('["书籍籍"]') and not automaton.accepts('["书"')


def test_every_training_target_is_accepted_by_its_own_automaton(train, schema):
    accepted = 0
    for ex in train:
        if ex.task != EXTRACTION:
            continue
        spans = [t[key] for t in ex.answer for key in ("subject", "object")]
        if not all(span in ex.text and not any(ch.isspace() for ch in span) for span in spans):
            continue  # a handful of spans are not in the text or hold a space: they cannot be copied
        automaton = TripleConstraint(schema, ex.text).automaton()
        assert automaton.accepts(ex.target), ex.target
        accepted += 1
    assert accepted >= 450


def test_triple_automaton_accepts_valid_answers_and_all_their_prefixes(schema):
    automaton = TripleConstraint(schema, TEXT).automaton()
    good = [EMPTY_TRIPLES, answer_of(triple()), answer_of(triple(), triple(obj="周星", subject="喜剧"))]
    for answer in good:
        assert automaton.accepts(answer), answer
        assert all(automaton.is_prefix(answer[:i]) for i in range(len(answer)))
    assert not automaton.accepts(good[1][:-1])  # a prefix is not an answer


@pytest.mark.parametrize(
    "bad",
    [
        answer_of(triple(predicate="不存在")),  # predicate not in the schema
        answer_of(triple(object_type="地点")),  # type not listed for this predicate
        answer_of(triple(subject_type="人物")),
        answer_of(triple(obj="刘德华")),  # span not in the text
        answer_of(triple(subject="")),  # empty span
        answer_of(triple(obj="周星驰主演的电影》")),  # crosses the end of the text
        answer_of(triple(), triple()),  # repeated triple
        JSON_FENCE_OPEN + json.dumps([triple()], ensure_ascii=False, indent=1) + JSON_FENCE_CLOSE,
        JSON_FENCE_OPEN + json.dumps([triple()], ensure_ascii=False, separators=(",", ":")) + JSON_FENCE_CLOSE,
        JSON_FENCE_OPEN + json.dumps([dict(reversed(list(triple().items())))], ensure_ascii=False) + JSON_FENCE_CLOSE,
        "```json[]```",
        EMPTY_TRIPLES + "\n",
        "[]",
    ],
)
def test_triple_automaton_rejects_malformed_answers(schema, bad):
    assert not TripleConstraint(schema, TEXT).automaton().accepts(bad)


def test_spans_never_copy_characters_that_json_escapes(schema):
    text = 'He said "hi" \\ 你好\n世界\t!'
    automaton = TripleConstraint(schema, text).automaton()
    head = JSON_FENCE_OPEN + '[{"predicate": "主演", "object_type": "人物", "subject_type": "影视作品", "object": "'
    assert automaton.is_prefix(head + "你好")
    assert automaton.is_prefix(head + 'hi"')  # the quote closes the span "hi"
    for bad in ['"hi', "\\", " \\", "好\n", "界\t"]:
        assert not automaton.is_prefix(head + bad), bad
    # With nothing copyable, only the empty list remains.
    nothing = TripleConstraint(schema, '"\\\n').automaton()
    assert nothing.accepts(EMPTY_TRIPLES) and not nothing.is_prefix(JSON_FENCE_OPEN + "[{")


def test_max_triples_caps_the_list(schema):
    one = answer_of(triple())
    two = answer_of(triple(), triple(obj="周星"))
    capped = TripleConstraint(schema, TEXT, max_triples=1).automaton()
    assert capped.accepts(one) and not capped.accepts(two)
    assert not capped.is_prefix(one[: -len("]" + JSON_FENCE_CLOSE)] + ", ")
    none = TripleConstraint(schema, TEXT, max_triples=0).automaton()
    assert none.accepts(EMPTY_TRIPLES) and not none.is_prefix(JSON_FENCE_OPEN + "[{")


def test_repeat_ban_never_leads_into_a_dead_end():
    schema = {"predicates": {"p": {"subject_type": ["s"], "object_type": ["o"]}}}
    automaton = TripleConstraint(schema, "甲").automaton()
    first = answer_of(triple("p", "o", "s", "甲", "甲"))
    assert automaton.accepts(first)
    # The only possible triple is emitted: a second one may not even start, since it could never finish.
    assert not automaton.is_prefix(first[: -len("]" + JSON_FENCE_CLOSE)] + ", {")
    two_chars = TripleConstraint(schema, "甲乙").automaton()
    again = answer_of(triple("p", "o", "s", "甲", "甲"), triple("p", "o", "s", "甲", "甲乙"))
    assert two_chars.accepts(again)
    assert not two_chars.is_prefix(again[: -len('乙"}]' + JSON_FENCE_CLOSE)] + '"')


def test_cost_is_the_shortest_answer_in_characters_without_a_vocab(schema):
    triples = TripleConstraint(schema, TEXT).automaton()
    assert triples.cost(triples.initial()) == len(EMPTY_TRIPLES)
    categories = CategoryConstraint(["水果", "书"]).automaton()
    assert categories.cost(categories.initial()) == len('["书"]')


def test_spans_keep_inner_blanks_but_never_start_or_end_with_one(schema):
    text = "《 喜剧之王》 周星驰 主演\u3000I Do Believe "
    automaton = TripleConstraint(schema, text).automaton()
    head = JSON_FENCE_OPEN + '[{"predicate": "主演", "object_type": "人物", "subject_type": "影视作品", "object": "'
    assert automaton.is_prefix(head + "周星驰")
    assert not automaton.is_prefix(head + " ")  # no blank or space-led entity
    assert automaton.is_prefix(head + "周星驰 主")  # a blank inside a span, as the text has it
    assert not automaton.is_prefix(head + '周星驰 "')  # ... but never as its last character
    assert not automaton.is_prefix(head + "Believe ")  # a trailing blank the text ends with is not copyable
    assert automaton.is_prefix(head + "主演\u3000I")  # an ideographic space too
    assert automaton.accepts(answer_of(triple(obj="周星驰", subject="喜剧之王")))
    assert automaton.accepts(answer_of(triple(obj="I Do Believe", subject="喜剧之王")))


def test_schema_part_of_the_automaton_is_built_once_per_schema(tiny, schema):
    tokenizer, _ = tiny
    vocab = vocab_for(tokenizer)
    first = TripleConstraint(schema, TEXT).automaton(vocab)
    second = TripleConstraint(dict(schema), "周星驰").automaton(vocab)
    assert second.nodes is first.nodes and second.text == "周星驰"
    assert (
        CategoryConstraint(schema["labels"]).automaton(vocab).nodes
        is CategoryConstraint(list(schema["labels"])).automaton(vocab).nodes
    )
    # Another schema, another skeleton; a cached skeleton behaves as a fresh one.
    other = {"predicates": {"p": {"subject_type": ["s"], "object_type": ["o"]}}}
    assert TripleConstraint(other, TEXT).automaton(vocab).nodes is not first.nodes
    fresh = TripleConstraint(schema, TEXT).automaton()
    for answer in (answer_of(triple()), EMPTY_TRIPLES, answer_of(triple(), triple(obj="周星"))):
        assert first.accepts(answer) == fresh.accepts(answer) is True
    assert first.node_cost == fresh.node_cost
    assert TripleConstraint(schema, '"\\\n').automaton(vocab).cost(first.initial()) == first.cost(first.initial())
