"""Constrained decoding: automata on plain strings, vocab tries of three tokenizer kinds, and generation
with a tiny RANDOM model, whose answers must still be well-formed, in budget and batch-independent."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from finetune.data import (
    CLASSIFICATION,
    EXTRACTION,
    JSON_FENCE_CLOSE,
    JSON_FENCE_OPEN,
    PROMPT_TEMPLATE,
    TRIPLE_KEYS,
    derive_schema,
    load_split,
)
from finetune.families import CAUSAL
from finetune.tiny import SPECIAL_TOKENS, TinyConfig, build_tiny, corpus_chars
from model.decoding import (
    CategoryConstraint,
    GrammarLogitsProcessor,
    TripleConstraint,
    Vocab,
    constrained_generate,
    decode_answer,
    unconstrained_generate,
    vocab_for,
)

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


def _fast_tokenizer(core):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )


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
    return _fast_tokenizer(core)


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
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
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


def test_spans_never_hold_whitespace(schema):
    text = "《 喜剧之王》 周星驰 主演"
    automaton = TripleConstraint(schema, text).automaton()
    head = JSON_FENCE_OPEN + '[{"predicate": "主演", "object_type": "人物", "subject_type": "影视作品", "object": "'
    assert automaton.is_prefix(head + "周星驰")
    assert not automaton.is_prefix(head + " ")  # no blank or space-led entity
    assert not automaton.is_prefix(head + "周星驰 ")  # no trailing space (the parser would have to repair it)
    assert automaton.accepts(_answer(_triple(obj="周星驰", subject="喜剧之王")))
