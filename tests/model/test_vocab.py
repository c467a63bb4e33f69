"""model.vocab: token strings of three tokenizer kinds, the token-cost DP, cheapest spelling, and spans
copied from the tokenizer's view read back in the text."""

from __future__ import annotations

import pytest

from model.vocab import Vocab, vocab_for
from tests.model.decoding_support import (
    EMPTY_TRIPLES,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
