"""Constrained decoding: automata on plain strings, vocab tries of three tokenizer kinds, and generation
with a tiny RANDOM model, whose answers must still be well-formed, in budget and batch-independent."""

from __future__ import annotations

import copy
import json
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from core.dataset import (
    CLASSIFICATION,
    EXTRACTION,
    JSON_FENCE_CLOSE,
    JSON_FENCE_OPEN,
    PROMPT_TEMPLATE,
    TRIPLE_KEYS,
    derive_schema,
    load_split,
)
from core.families import CAUSAL
from finetune.tiny import SPECIAL_TOKENS, TinyConfig, build_tiny, corpus_chars, wrap_tokenizer
from model.decoding import (
    GrammarLogitsProcessor,
    constrained_generate,
    jump_forward_unsupported,
    unconstrained_generate,
)
from model.grammar import CategoryConstraint, TripleConstraint
from model.jump_forward import PREFIX_CACHE, JumpForwardDecoder, feed_width
from model.vocab import Vocab, decode_answer, vocab_for

EMPTY_TRIPLES = JSON_FENCE_OPEN + "[]" + JSON_FENCE_CLOSE


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def train(data_dir):
    return load_split(data_dir, "train")


@pytest.fixture(scope="module")
def schema(train) -> dict:
    return derive_schema(train)


@pytest.fixture(scope="module")
def dev_texts(data_dir) -> list[str]:
    """20 dev texts of mixed lengths (shortest to longest)."""
    texts = sorted({ex.text for ex in load_split(data_dir, "dev")}, key=len)
    step = max(1, len(texts) // 20)
    return texts[::step][:20]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model's matrices are too small to gain from threads, which only contend on a busy CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, data_dir):
    """The tiny random Llama and its char tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = build_tiny(TinyConfig(output_dir=str(tmp_path_factory.mktemp("tiny_decoding")), data_dir=str(data_dir)))
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    return tokenizer, model


@pytest.fixture(scope="module")
def multichar_tokenizer(data_dir, train, schema):
    """A unigram tokenizer whose tokens span several characters, some across grammar pieces ('"}, {"predicate": "')."""
    from tokenizers import Tokenizer, decoders, models

    pieces = ["```json", "```json\n[", '```json\n[{"predicate": "', '": "', '", "', '{"predicate": "']
    pieces += ['"}, {"predicate": "', '"}', '"}]\n```', "]\n```", "\n```", '"]', '["', "object_type", "subject"]
    pieces += schema["labels"] + list(schema["predicates"])
    for entry in schema["predicates"].values():
        pieces += entry["subject_type"] + entry["object_type"]
    bigrams = Counter(ex.text[i : i + 2] for ex in train for i in range(len(ex.text) - 1))
    pieces += [b for b, _ in bigrams.most_common(600)]
    vocab = [(tok, 0.0) for tok in SPECIAL_TOKENS.values()]
    seen = set(SPECIAL_TOKENS.values())
    for tok in corpus_chars(data_dir) + pieces:
        if tok not in seen:
            seen.add(tok)
            vocab.append((tok, -1.0))  # equal scores: Viterbi picks the fewest tokens
    core = Tokenizer(models.Unigram(vocab, unk_id=1))
    core.decoder = decoders.Fuse()
    return wrap_tokenizer(core)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory, train):
    """A sentencepiece BPE tokenizer like ChatGLM-6B's: '▁' for spaces, a dummy-prefix space, byte fallback."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    prefix = tmp_path_factory.mktemp("sp") / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([ex.context + ex.target for ex in train]),
        model_prefix=str(prefix),
        vocab_size=3000,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return LlamaTokenizer(str(prefix) + ".model", legacy=True)


def left_padded(tokenizer, schema: dict, texts: list[str], task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The generation batch exactly as serving builds it: training prompt, family prefix, left padding."""
    rows = []
    for text in texts:
        prompt = PROMPT_TEMPLATE.format(
            instruction=schema["prompt"]["instruction"], phrasing=schema["prompt"]["phrasings"][task][0], text=text
        )
        rows.append(CAUSAL.build_generation_ids(tokenizer, tokenizer.encode(prompt, add_special_tokens=False)))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return input_ids, attention_mask


def assert_category(answer: str, labels: list[str]) -> None:
    assert answer in {json.dumps([label], ensure_ascii=False) for label in labels}, answer


def assert_triples(answer: str, text: str, schema: dict, max_triples: int = 16) -> list[dict]:
    """Exactly the training format, schema-consistent, spans copied from the text, no repeats."""
    assert answer.startswith(JSON_FENCE_OPEN) and answer.endswith(JSON_FENCE_CLOSE), answer
    triples = json.loads(answer[len(JSON_FENCE_OPEN) : -len(JSON_FENCE_CLOSE)])
    # Re-serialising must give back the same characters: separators, key order, no escapes.
    assert answer == JSON_FENCE_OPEN + json.dumps(triples, ensure_ascii=False) + JSON_FENCE_CLOSE
    assert isinstance(triples, list) and len(triples) <= max_triples
    for triple in triples:
        assert tuple(triple) == TRIPLE_KEYS
        entry = schema["predicates"][triple["predicate"]]
        assert triple["subject_type"] in entry["subject_type"] and triple["object_type"] in entry["object_type"]
        for key in ("subject", "object"):
            assert triple[key] and triple[key] in text, (key, triple[key])
    assert len({tuple(t.values()) for t in triples}) == len(triples), "a triple is repeated"
    return triples


def random_walk(tokenizer, constraints, max_new_tokens: int, seed: int) -> tuple[list[list[int]], object]:
    """generate()'s greedy loop with random logits instead of a model: random paths through every grammar.
    The logits are wider than the tokenizer, like a model whose embedding matrix is padded."""
    end = tokenizer.eos_token_id
    pad = end if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    generator = torch.Generator().manual_seed(seed)
    prompt_length = 3
    input_ids = torch.full((len(constraints), prompt_length), pad)
    processor = GrammarLogitsProcessor(tokenizer, constraints, prompt_length, max_new_tokens, end)
    finished = torch.zeros(len(constraints), dtype=torch.bool)
    for _ in range(max_new_tokens):
        scores = torch.randn(len(constraints), len(tokenizer) + 7, generator=generator)
        chosen = processor(input_ids, scores).argmax(dim=-1)
        chosen = torch.where(finished, torch.full_like(chosen, pad), chosen)
        input_ids = torch.cat([input_ids, chosen[:, None]], dim=1)
        finished |= chosen == end
        if finished.all():
            break
    answers = []
    for row in input_ids[:, prompt_length:].tolist():
        assert end in row, f"a row hit max_new_tokens={max_new_tokens} without the end token"
        answers.append(row[: row.index(end)])
    return answers, processor


# --------------------------------------------------------------------------- automata on plain strings


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


def _triple(predicate="主演", object_type="人物", subject_type="影视作品", obj="周星驰", subject="喜剧之王") -> dict:
    return dict(zip(TRIPLE_KEYS, (predicate, object_type, subject_type, obj, subject), strict=True))


def _answer(*triples: dict) -> str:
    return JSON_FENCE_OPEN + json.dumps(list(triples), ensure_ascii=False) + JSON_FENCE_CLOSE


TEXT = "《喜剧之王》是周星驰主演的电影"


def test_triple_automaton_accepts_valid_answers_and_all_their_prefixes(schema):
    automaton = TripleConstraint(schema, TEXT).automaton()
    good = [EMPTY_TRIPLES, _answer(_triple()), _answer(_triple(), _triple(obj="周星", subject="喜剧"))]
    for answer in good:
        assert automaton.accepts(answer), answer
        assert all(automaton.is_prefix(answer[:i]) for i in range(len(answer)))
    assert not automaton.accepts(good[1][:-1])  # a prefix is not an answer


@pytest.mark.parametrize(
    "bad",
    [
        _answer(_triple(predicate="不存在")),  # predicate not in the schema
        _answer(_triple(object_type="地点")),  # type not listed for this predicate
        _answer(_triple(subject_type="人物")),
        _answer(_triple(obj="刘德华")),  # span not in the text
        _answer(_triple(subject="")),  # empty span
        _answer(_triple(obj="周星驰主演的电影》")),  # crosses the end of the text
        _answer(_triple(), _triple()),  # repeated triple
        JSON_FENCE_OPEN + json.dumps([_triple()], ensure_ascii=False, indent=1) + JSON_FENCE_CLOSE,
        JSON_FENCE_OPEN + json.dumps([_triple()], ensure_ascii=False, separators=(",", ":")) + JSON_FENCE_CLOSE,
        JSON_FENCE_OPEN + json.dumps([dict(reversed(list(_triple().items())))], ensure_ascii=False) + JSON_FENCE_CLOSE,
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
    one = _answer(_triple())
    two = _answer(_triple(), _triple(obj="周星"))
    capped = TripleConstraint(schema, TEXT, max_triples=1).automaton()
    assert capped.accepts(one) and not capped.accepts(two)
    assert not capped.is_prefix(one[: -len("]" + JSON_FENCE_CLOSE)] + ", ")
    none = TripleConstraint(schema, TEXT, max_triples=0).automaton()
    assert none.accepts(EMPTY_TRIPLES) and not none.is_prefix(JSON_FENCE_OPEN + "[{")


def test_repeat_ban_never_leads_into_a_dead_end():
    schema = {"predicates": {"p": {"subject_type": ["s"], "object_type": ["o"]}}}
    automaton = TripleConstraint(schema, "甲").automaton()
    first = _answer(_triple("p", "o", "s", "甲", "甲"))
    assert automaton.accepts(first)
    # The only possible triple is emitted: a second one may not even start, since it could never finish.
    assert not automaton.is_prefix(first[: -len("]" + JSON_FENCE_CLOSE)] + ", {")
    two_chars = TripleConstraint(schema, "甲乙").automaton()
    again = _answer(_triple("p", "o", "s", "甲", "甲"), _triple("p", "o", "s", "甲", "甲乙"))
    assert two_chars.accepts(again)
    assert not two_chars.is_prefix(again[: -len('乙"}]' + JSON_FENCE_CLOSE)] + '"')


def test_cost_is_the_shortest_answer_in_characters_without_a_vocab(schema):
    triples = TripleConstraint(schema, TEXT).automaton()
    assert triples.cost(triples.initial()) == len(EMPTY_TRIPLES)
    categories = CategoryConstraint(["水果", "书"]).automaton()
    assert categories.cost(categories.initial()) == len('["书"]')


# --------------------------------------------------------------------------- vocabularies


def test_token_strings_concatenate_to_the_text(tiny, multichar_tokenizer, sp_tokenizer, train):
    tiny_tokenizer, _ = tiny
    for tokenizer in (tiny_tokenizer, multichar_tokenizer):
        vocab = vocab_for(tokenizer)
        assert vocab.lead == ""
        for ex in train[:50]:
            ids = tokenizer.encode(ex.context + ex.target, add_special_tokens=False)
            assert "".join(vocab.strings[i] for i in ids) == ex.context + ex.target
    sp_vocab = vocab_for(sp_tokenizer)
    assert sp_vocab.lead == " "  # sentencepiece's dummy prefix: the model learnt answers that start with '▁'
    checked = 0
    for ex in train:
        ids = sp_tokenizer.encode(ex.target, add_special_tokens=False)
        if all(sp_vocab.strings[i] is not None for i in ids):  # byte-fallback pieces of rare characters have none
            assert "".join(sp_vocab.strings[i] for i in ids) == " " + ex.target
            assert sp_vocab.decode(ids) == sp_tokenizer.decode(ids) == ex.target
            checked += 1
    assert checked >= 300
    assert vocab_for(sp_tokenizer) is sp_vocab  # built once per tokenizer


def test_tok_cost_counts_the_fewest_tokens(multichar_tokenizer):
    vocab = Vocab(multichar_tokenizer)
    assert vocab.tok_cost('```json\n[{"predicate": "') == 1
    assert vocab.tok_cost(EMPTY_TRIPLES) == 2  # '```json\n[' + ']\n```'
    assert vocab.tok_cost('["水果"]') == 3
    assert vocab.tok_cost("\x00") == float("inf")


# --------------------------------------------------------------------------- processor with random logits


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
    processor = GrammarLogitsProcessor(tokenizer, [CategoryConstraint(schema["labels"])] * 2, 4, 10, end)
    input_ids = torch.zeros((2, 4), dtype=torch.long)
    scores = torch.randn(2, len(tokenizer))
    out = processor(input_ids, scores.clone())
    allowed = torch.isfinite(out)
    assert allowed.sum(dim=1).tolist() == [1, 1]  # every label starts with '['
    assert torch.equal(out[allowed], scores[allowed])
    # Another processor may have banned every allowed token: the row must still pick an allowed one.
    processor = GrammarLogitsProcessor(tokenizer, [CategoryConstraint(schema["labels"])] * 2, 4, 10, end)
    out = processor(input_ids, torch.full((2, len(tokenizer)), -float("inf")))
    assert tokenizer.convert_ids_to_tokens(out.argmax(dim=-1).tolist()) == ["[", "["]
    with pytest.raises(ValueError, match="constraints"):
        processor(torch.zeros((3, 4), dtype=torch.long), torch.zeros(3, len(tokenizer)))


def _allowed_strings(tokenizer, constraint, prefix: str, tokens_left: int) -> set[str]:
    """Token strings the processor allows after `prefix` was generated, with `tokens_left` new tokens to go."""
    prefix_ids = tokenizer.encode(prefix, add_special_tokens=False)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * 2 + prefix_ids])
    end = tokenizer.eos_token_id
    processor = GrammarLogitsProcessor(tokenizer, [constraint], 2, len(prefix_ids) + tokens_left, end)
    out = processor(input_ids, torch.zeros(1, len(tokenizer)))
    return {tokenizer.convert_ids_to_tokens(i) for i in torch.isfinite(out[0]).nonzero()[:, 0].tolist()}


def test_near_the_budget_only_closing_moves_are_allowed(tiny, schema):
    tokenizer, _ = tiny
    constraint = TripleConstraint(schema, TEXT)
    in_object = _answer(_triple())[: -len('驰", "subject": "喜剧之王"}]' + JSON_FENCE_CLOSE)]  # ... "object": "周星
    to_close = len('", "subject": "喜"}]' + JSON_FENCE_CLOSE)  # shortest way out, in characters = tokens here
    assert _allowed_strings(tokenizer, constraint, in_object, to_close + 1) == {'"'}  # +1: the end token
    assert _allowed_strings(tokenizer, constraint, in_object, to_close + 2) == {'"', "驰"}
    after_one = _answer(_triple())[: -len("]" + JSON_FENCE_CLOSE)]
    assert _allowed_strings(tokenizer, constraint, after_one, 200) == {"]", ","}
    assert _allowed_strings(tokenizer, constraint, after_one, 60) == {"]"}  # no room for another triple
    assert _allowed_strings(tokenizer, constraint, _answer(_triple()), 3) == {tokenizer.eos_token}


def test_budget_below_the_shortest_answer_still_moves_towards_it(tiny, schema):
    tokenizer, _ = tiny
    automaton = CategoryConstraint(schema["labels"]).automaton()
    end = tokenizer.eos_token_id
    processor = GrammarLogitsProcessor(tokenizer, [CategoryConstraint(schema["labels"])], 1, 3, end)
    input_ids = torch.zeros((1, 1), dtype=torch.long)
    for _ in range(3):
        chosen = processor(input_ids, torch.randn(1, len(tokenizer))).argmax(dim=-1)
        input_ids = torch.cat([input_ids, chosen[:, None]], dim=1)
    answer = input_ids[0, 1:].tolist()
    # 3 tokens cannot hold '["书"]' + end: the row is cut, but what it wrote is a valid start.
    assert len(answer) == 3 and end not in answer
    assert automaton.is_prefix(tokenizer.decode(answer))


# --------------------------------------------------------------------------- the tiny random model


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
    assert automaton.accepts(_answer(_triple(obj="周星驰", subject="喜剧之王")))
    assert automaton.accepts(_answer(_triple(obj="I Do Believe", subject="喜剧之王")))


@pytest.mark.parametrize("obj, subject", [("I Do Believe", "喜剧之王"), ("周星驰", "I Do Believe")],
                         ids=["object", "subject"])
def test_a_span_with_an_inner_space_is_produced_whole(tiny, schema, obj, subject):
    """Teacher-forced through the processor, as decoding sees it: the gold tokens of an object (or a
    subject: its own cost rule) with an inner space are all allowed, and the budget still lets it close."""
    tokenizer, _ = tiny
    text = "《喜剧之王》的主题曲是I Do Believe，周星驰主演"
    answer = _answer(_triple(obj=obj, subject=subject))
    ids = tokenizer.encode(answer, add_special_tokens=False)
    end = tokenizer.eos_token_id
    proc = GrammarLogitsProcessor(tokenizer, [TripleConstraint(schema, text)], 1, len(ids) + 1, end)
    seq = [0]
    for token in ids + [end]:
        masked = proc(torch.tensor([seq]), torch.zeros(1, len(tokenizer)))
        assert not torch.isneginf(masked[0, token]), f"{tokenizer.decode(seq[1:])!r} + {tokenizer.decode([token])!r}"
        seq.append(token)
    assert decode_answer(tokenizer, seq[1:]) == answer


# --------------------------------------------------------------------------- jump-forward decoding


@contextmanager
def counting_passes(model):
    """Counts the decoder's forward passes, whichever way generation reaches it."""
    calls = [0]
    handle = model.get_decoder().register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def _constraints(schema: dict, texts: list[str], task: str) -> list:
    if task == CLASSIFICATION:
        return [CategoryConstraint(schema["labels"]) for _ in texts]
    return [TripleConstraint(schema, text) for text in texts]


def both_ways(model, tokenizer, schema, texts, task, max_new_tokens) -> tuple[list, list, int, int]:
    """(token-by-token answers, jump-forward answers, forward passes of each) for one batch."""
    end = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    input_ids, mask = left_padded(tokenizer, schema, texts, task)
    answers, passes = [], []
    for jump in (False, True):
        with counting_passes(model) as calls:
            constraints = _constraints(schema, texts, task)
            answers.append(
                constrained_generate(
                    model, tokenizer, input_ids, mask, constraints, max_new_tokens, end, pad, jump_forward=jump
                )
            )
        passes.append(calls[0])
    return answers[0], answers[1], passes[0], passes[1]


@pytest.fixture(scope="module")
def trained(merged_model):
    """The briefly trained tiny model (30 LoRA steps, merged): answers shaped by training, not random."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_model), local_files_only=True)
    return tokenizer, AutoModelForCausalLM.from_pretrained(str(merged_model), local_files_only=True).eval()


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


def _random_llama(tokenizer, seed: int = 0):
    """A tiny random Llama over `tokenizer`'s vocabulary (the tiny model's vocabulary is the char tokenizer's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("which", ["multichar", "sentencepiece"])
def test_jump_forward_with_multichar_tokens_is_well_formed_in_budget_and_batch_independent(
    request, which, schema, dev_texts
):
    """With multi-character tokens, literals are spelled with their cheapest split instead of being chosen token
    by token, so answers may differ from token-by-token decoding; they must still be valid and in budget."""
    tokenizer = request.getfixturevalue("multichar_tokenizer" if which == "multichar" else "sp_tokenizer")
    model = _random_llama(tokenizer)
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
                    automaton = _constraints(schema, [text], task)[0].automaton(vocab)
                    assert max_new_tokens <= automaton.cost(automaton.initial())
        if task == EXTRACTION:
            # The literal pieces of the grammar go out as the vocabulary's long tokens.
            assert any(len(vocab.strings[i]) > 3 for ids in new for i in ids)
    # Rows are independent: one at a time gives the same tokens as the batch.
    texts = dev_texts[::5]
    input_ids, mask = left_padded(tokenizer, schema, texts, EXTRACTION)
    batched = constrained_generate(
        model, tokenizer, input_ids, mask, _constraints(schema, texts, EXTRACTION), 200, end, pad
    )
    for text, ids in zip(texts, batched, strict=True):
        one_ids, one_mask = left_padded(tokenizer, schema, [text], EXTRACTION)
        single = constrained_generate(
            model, tokenizer, one_ids, one_mask, _constraints(schema, [text], EXTRACTION), 200, end, pad
        )
        assert single == [ids]


def test_feed_width_policies():
    assert feed_width([1, 60, 15, 1], "all") == 60
    assert feed_width([1, 60, 15, 1], "median") == 1  # the lower median: half the rows feed their whole queue
    assert feed_width([3, 60, 15], "median") == 15
    assert feed_width([7], "median") == feed_width([7], "all") == 7
    with pytest.raises(ValueError, match="feed must be one of"):
        JumpForwardDecoder(None, None, 8, 0, feed="longest")


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
            processor = GrammarLogitsProcessor(
                tokenizer, _constraints(schema, chunk, EXTRACTION), input_ids.shape[1], 128, end
            )
            decoder = JumpForwardDecoder(model, processor, 128, pad, prefix_cache=False, feed=feed)
            answers[feed] = decoder.run(input_ids, mask)
            totals[feed].update(fed=decoder.fed, padding=decoder.padding, passes=decoder.passes)
        assert answers["median"] == answers["all"], start
    real = totals["all"]["fed"] - totals["all"]["padding"]
    assert real == totals["median"]["fed"] - totals["median"]["padding"] > 0
    assert totals["median"]["passes"] >= totals["all"]["passes"]
    assert totals["median"]["padding"] * 2 <= totals["all"]["padding"], totals
    if which == "random":  # its rows write triples of different shapes, so whole runs are out of step
        assert totals["all"]["padding"] > real / 10, totals
    # "auto" is the median on a CPU and whole runs on an accelerator, where a pass costs about the same either way.
    decoder = JumpForwardDecoder(model, GrammarLogitsProcessor(tokenizer, [], 0, 8, end), 8, pad)
    assert decoder._policy(torch.device("cpu")) == "median" and decoder._policy(torch.device("cuda")) == "all"


def test_split_spells_with_the_fewest_and_longest_tokens(multichar_tokenizer, sp_tokenizer):
    vocab = vocab_for(multichar_tokenizer)
    strings = lambda ids: [vocab.strings[i] for i in ids]  # noqa: E731
    assert strings(vocab.split('```json\n[{"predicate": "')) == ['```json\n[{"predicate": "']
    assert strings(vocab.split(EMPTY_TRIPLES)) == ["```json\n[", "]\n```"]
    assert len(vocab.split('["水果"]')) == vocab.tok_cost('["水果"]') == 3
    assert vocab.split("\x00") is None
    assert vocab.split("") == ()
    # A sentencepiece vocabulary holds byte-fallback pieces too ('<0x20>' for ' '): spell with the real piece.
    sp_vocab = vocab_for(sp_tokenizer)
    pieces = sp_tokenizer.convert_ids_to_tokens(list(sp_vocab.split(' "object": "')))
    assert not any(p.startswith("<0x") for p in pieces), pieces


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
    for answer in (_answer(_triple()), EMPTY_TRIPLES, _answer(_triple(), _triple(obj="周星"))):
        assert first.accepts(answer) == fresh.accepts(answer) is True
    assert first.node_cost == fresh.node_cost
    assert TripleConstraint(schema, '"\\\n').automaton(vocab).cost(first.initial()) == first.cost(first.initial())


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
    constraints = _constraints(schema, dev_texts[:3], CLASSIFICATION)
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


class RandomCausalLM(torch.nn.Module):
    """Random logits behind the interface jump-forward uses (not a Llama: no output-layer shortcut), checking
    on every pass that cache, mask and positions agree: each row's real tokens get consecutive positions."""

    def __init__(self, vocab_size: int, seed: int):
        super().__init__()
        self.config = type("Config", (), {"model_type": "random", "is_encoder_decoder": False})()
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab_size = vocab_size + 7  # wider than the tokenizer, like a padded embedding matrix
        self.passes = 0

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, return_dict):
        batch, width = input_ids.shape
        total = attention_mask.shape[1]
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        assert use_cache and past_length + width == total
        assert past_key_values is None or past_key_values[0][0].shape[0] == batch
        before = attention_mask[:, :past_length].sum(dim=1)
        for row in range(batch):
            real = attention_mask[row, past_length:] == 1
            assert real[-1], "every row's last fed token is real: its logits are read there"
            expected = torch.arange(int(real.sum())) + before[row]
            assert torch.equal(position_ids[row][real], expected)
        self.passes += 1
        cache = torch.zeros(batch, 1, total, 1)
        logits = torch.randn(batch, width, self.vocab_size, generator=self.generator)
        return type("Out", (), {"logits": logits, "past_key_values": ((cache, cache),)})()


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
                model, tokenizer, input_ids, mask, _constraints(schema, dev_texts, task), max_new_tokens, end, pad
            )
            assert model.passes <= max_new_tokens
            vocab = vocab_for(tokenizer)
            n_triples = 0
            for ids, text in zip(answers, dev_texts, strict=True):
                answer = decode_answer(tokenizer, ids)
                assert answer == tokenizer.decode(ids) and end not in ids
                automaton = _constraints(schema, [text], task)[0].automaton(vocab)
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


# --------------------------------------------------------------------------- shared-prefix cache


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    return input_ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])


def _jump(model, tokenizer, input_ids, mask, constraints, max_new_tokens, prefix_cache) -> tuple[list, int]:
    """Jump-forward answers and the prompt tokens the first pass took from the prefix cache."""
    end = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    processor = GrammarLogitsProcessor(tokenizer, constraints, input_ids.shape[1], max_new_tokens, end)
    decoder = JumpForwardDecoder(model, processor, max_new_tokens, pad, prefix_cache=prefix_cache)
    return decoder.run(input_ids, mask), decoder.prefix_length


@pytest.mark.parametrize("which", ["random", "trained"])
def test_shared_prefix_cache_gives_the_same_tokens(request, which, schema, dev_texts):
    """predict()'s batches of 8, both tasks: the prefix is run once, reused across calls, answers unchanged (fp32)."""
    tokenizer, model = request.getfixturevalue("tiny" if which == "random" else "trained")
    PREFIX_CACHE.clear()
    runs, hits = PREFIX_CACHE.runs, PREFIX_CACHE.hits
    calls = 0
    for task, max_new_tokens in ((CLASSIFICATION, 7), (EXTRACTION, 128), (CLASSIFICATION, 3)):
        texts = sorted(dev_texts, key=len)
        for start in range(0, len(texts), 8):
            chunk = texts[start : start + 8]
            input_ids, mask = left_padded(tokenizer, schema, chunk, task)
            plain, none = _jump(
                model, tokenizer, input_ids, mask, _constraints(schema, chunk, task), max_new_tokens, False
            )
            cached, length = _jump(
                model, tokenizer, input_ids, mask, _constraints(schema, chunk, task), max_new_tokens, True
            )
            assert none == 0 and length > 40, length  # the instruction and the phrasing at least
            assert cached == plain, (which, task, max_new_tokens, start)
            calls += 1
    # A pass of its own for a few prefixes (each task's, the part both share), cached for the other calls.
    assert PREFIX_CACHE.runs - runs <= 5 and PREFIX_CACHE.hits - hits >= calls - 5
    # A single comment reuses its task's cached prefix.
    input_ids, mask = left_padded(tokenizer, schema, dev_texts[:1], EXTRACTION)
    runs = PREFIX_CACHE.runs
    one = dev_texts[:1]
    plain, _ = _jump(model, tokenizer, input_ids, mask, _constraints(schema, one, EXTRACTION), 128, False)
    cached, length = _jump(model, tokenizer, input_ids, mask, _constraints(schema, one, EXTRACTION), 128, True)
    assert cached == plain and length > 40 and PREFIX_CACHE.runs == runs


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
                model, tokenizer, input_ids, mask, _constraints(schema, texts, task), max_new_tokens, False
            )
            cached, length = _jump(
                model, tokenizer, input_ids, mask, _constraints(schema, texts, task), max_new_tokens, True
            )
            assert cached == plain, (name, task)
            assert length < min(len(r) for r in rows), name  # every row feeds a token of its own
            if name == "no shared prefix":
                assert length == 0
    # The cached prefix of a model is not used once its weights change in place, nor for another model.
    other = copy.deepcopy(model)
    input_ids, mask = left_padded(tokenizer, schema, dev_texts[:8], CLASSIFICATION)
    texts = dev_texts[:8]
    before, _ = _jump(other, tokenizer, input_ids, mask, _constraints(schema, texts, CLASSIFICATION), 7, True)
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(-1.5)
    plain, _ = _jump(other, tokenizer, input_ids, mask, _constraints(schema, texts, CLASSIFICATION), 7, False)
    runs = PREFIX_CACHE.runs
    cached, length = _jump(other, tokenizer, input_ids, mask, _constraints(schema, texts, CLASSIFICATION), 7, True)
    assert cached == plain and length > 0 and PREFIX_CACHE.runs == runs + 1


def test_spans_copied_from_the_tokenizers_view_read_back_in_the_text():
    """ChatGLM-6B's tokenizer NFKC-normalises: the model copies '(' where the text has '（'."""
    from model.vocab import restore_span

    text, view = "《中国建筑画选（平装）》是图书", "《中国建筑画选(平装)》是图书"
    assert restore_span("中国建筑画选(平装)", view, text) == "中国建筑画选（平装）"
    assert restore_span("图书", view, text) == "图书"
    assert restore_span("不在文中", view, text) == "不在文中"  # left for the parser to reject


def test_a_span_the_tokenizer_lengthened_reads_back_in_the_text():
    from model.vocab import restore_span

    text, view = "《新概念英语Ⅱ》的作者", "《新概念英语II》的作者"
    assert restore_span("新概念英语II", view, text) == "新概念英语Ⅱ"
    assert restore_span("的作者", view, text) == "的作者"
    assert restore_span("语I", view, text) == "语I"  # cuts through 'II': not mapped, the parser rejects it
