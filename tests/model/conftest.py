"""Fixtures of the decoding tests (model.grammar, vocab, matcher, decoding, jump_forward, prefix_cache):
the dataset's schema and texts, the tiny random model, three tokenizer kinds, the briefly trained model.
Session-scoped, so the split test modules build each once."""

from __future__ import annotations

import inspect
from collections import Counter

import pytest
import torch

from core.dataset import (
    derive_schema,
    load_split,
)
from finetune.tiny import SPECIAL_TOKENS, TinyConfig, build_tiny, corpus_chars, wrap_tokenizer


@pytest.fixture(scope="session")
def train(data_dir):
    return load_split(data_dir, "train")


@pytest.fixture(scope="session")
def schema(train) -> dict:
    return derive_schema(train)


@pytest.fixture(scope="session")
def dev_texts(data_dir) -> list[str]:
    """20 dev texts of mixed lengths (shortest to longest)."""
    texts = sorted({ex.text for ex in load_split(data_dir, "dev")}, key=len)
    step = max(1, len(texts) // 20)
    return texts[::step][:20]


@pytest.fixture
def one_torch_thread():
    """The tiny model's matrices are too small to gain from threads, which only contend on a busy CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, data_dir):
    """The tiny random Llama and its char tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = build_tiny(TinyConfig(output_dir=str(tmp_path_factory.mktemp("tiny_decoding")), data_dir=str(data_dir)))
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    return tokenizer, model


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
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
    if "vocab_file" in inspect.signature(LlamaTokenizer.__init__).parameters:  # transformers 4.x: sentencepiece itself
        return LlamaTokenizer(str(prefix) + ".model", legacy=True)
    # transformers 5 reads a .model file through protobuf >= 4, which Streamlit 1.17 rules out: the same
    # pieces and merges handed to its tokenizers-backed LlamaTokenizer.
    from transformers.convert_slow_tokenizer import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(prefix) + ".model")
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), legacy=True)


@pytest.fixture(scope="session")
def trained(merged_model):
    """The briefly trained tiny model (30 LoRA steps, merged): answers shaped by training, not random."""
    import torch
    from transformers import AutoTokenizer

    from core.families import CAUSAL, load_model

    tokenizer = AutoTokenizer.from_pretrained(str(merged_model), local_files_only=True)
    # float32 on both lanes: the merged weights are fp16 on disk, which transformers 5 would keep by default.
    return tokenizer, load_model(merged_model, CAUSAL, torch_dtype=torch.float32).eval()
