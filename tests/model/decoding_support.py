"""Helpers shared by the decoding tests: prompts batched as serving builds them, format checks,
random walks through the grammar, answers to feed automata, both decoding ways side by side."""

from __future__ import annotations

import json
from contextlib import contextmanager

import torch

from core.dataset import (
    CLASSIFICATION,
    JSON_FENCE_CLOSE,
    JSON_FENCE_OPEN,
    PROMPT_TEMPLATE,
    TRIPLE_KEYS,
)
from core.families import CAUSAL
from model.decoding import (
    constrained_generate,
    grammar_processor,
)
from model.grammar import CategoryConstraint, TripleConstraint

EMPTY_TRIPLES = JSON_FENCE_OPEN + "[]" + JSON_FENCE_CLOSE


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
    processor = grammar_processor(tokenizer, constraints, prompt_length, max_new_tokens, end)
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


def triple(predicate="主演", object_type="人物", subject_type="影视作品", obj="周星驰", subject="喜剧之王") -> dict:
    return dict(zip(TRIPLE_KEYS, (predicate, object_type, subject_type, obj, subject), strict=True))


def answer_of(*triples: dict) -> str:
    return JSON_FENCE_OPEN + json.dumps(list(triples), ensure_ascii=False) + JSON_FENCE_CLOSE


TEXT = "《喜剧之王》是周星驰主演的电影"


@contextmanager
def counting_passes(model):
    """Counts the decoder's forward passes, whichever way generation reaches it."""
    calls = [0]
    handle = model.get_decoder().register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def constraints_for(schema: dict, texts: list[str], task: str) -> list:
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
            constraints = constraints_for(schema, texts, task)
            answers.append(
                constrained_generate(
                    model, tokenizer, input_ids, mask, constraints, max_new_tokens, end, pad, jump_forward=jump
                )
            )
        passes.append(calls[0])
    return answers[0], answers[1], passes[0], passes[1]


def random_llama(tokenizer, seed: int = 0):
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


def favour_triples(lm, bias: float = 6.0):
    """Lift the logits of tokens holding '{' so a briefly trained model writes triples (it would answer [])
    and the spans it copies put many real choices through both ways. Both ways call the same output layer."""
    from model.vocab import vocab_for

    strings = vocab_for(lm.tokenizer).strings
    head = lm.model.get_output_embeddings()
    lift = torch.zeros(head.weight.shape[0])
    lift[[i for i, s in enumerate(strings) if s and "{" in s]] = bias
    return head.register_forward_hook(lambda module, args, out: out + lift.to(out.dtype))


def assert_jump_forward_equals_generate(lm, examples, n: int = 8) -> None:
    """model.decode_check on n comments and n sentences (favouring triples, so spans are compared, not only
    the empty list): every answer token-identical to HF generate() under the same rules, in far fewer passes."""
    from core.dataset import CLASSIFICATION, EXTRACTION
    from model import decode_check
    from model.parsing import parse_triples
    from model.predict import generate_answers
    from model.vocab import decode_answer

    comments = [ex.text for ex in examples if ex.task == CLASSIFICATION][:n]
    report = decode_check.compare(lm, comments, CLASSIFICATION, batch_size=4)
    assert report["identical"] == report["n"] == len(comments), report["first_difference"]
    sentences = [ex.text for ex in examples if ex.task == EXTRACTION][:n]
    hook = favour_triples(lm)
    try:
        report = decode_check.compare(lm, sentences, EXTRACTION, batch_size=4)
        assert report["identical"] == report["n"] == len(sentences), report["first_difference"]
        assert 0 < report["passes"]["jump"] * 2 < report["passes"]["generate"], report["passes"]
        answers = generate_answers(lm, sentences, EXTRACTION, batch_size=4)
    finally:
        hook.remove()
    assert sum(len(parse_triples(decode_answer(lm.tokenizer, a.ids)).triples) for a in answers) > 0
