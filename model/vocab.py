"""The tokenizer's vocabulary as a character trie of token strings, with the token-cost DP the budget uses.

Built once per tokenizer and cached (`vocab_for`): constrained decoding walks this trie and a row's
automaton (model.grammar) together, so it visits only token strings that are valid continuations.
"""

from __future__ import annotations

import difflib
import math
import re
import threading
import weakref
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from core.dataset import JSON_FENCE_OPEN

INF = math.inf  # the cost of a string no token sequence spells

if TYPE_CHECKING:
    from model.grammar import Skeleton

# The vocabulary trie is nested dicts keyed by character; the key IDS ('', never a character)
# holds the ids of the tokens that end at that node. Plain dicts build ~3x faster than node objects.
IDS = ""
Trie = dict


# ChatGLM's control tokens, which its tokenizers do not list in all_special_ids: ChatGLM-6B's [gMASK] and
# [sMASK] decode to their names, and so do ChatGLM3's sop, eop and role tokens. A span must never be
# spelled with one (the model only ever saw them as markers), so they get no string.
_CONTROL_PIECE = re.compile(r"\[[gs]?MASK\]|<?[se]op>?|<ENC>|<dBLOCK>|<unused_\d+>|<image_\d+>"
                            r"|<\|(?:system|user|assistant|observation)\|>")


def control_ids(tokenizer) -> set[int]:
    """Ids of ChatGLM control tokens: their piece is a control name that maps back to this very id (an
    ordinary sentencepiece piece 'sop' that the special 'sop' shadows stays text)."""
    ids = set()
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if isinstance(piece, str) and _CONTROL_PIECE.fullmatch(piece) and tokenizer.convert_tokens_to_ids(piece) == i:
            ids.add(i)
    return ids


def token_strings(tokenizer) -> list[str | None]:
    """The text each token adds to a decoded sequence (None: special, empty or partial UTF-8 byte tokens).

    decode([anchor, id]) minus decode([anchor]) keeps what decoding one token alone would lose:
    sentencepiece's '▁' as a space, '<n>' as a newline; concatenating these strings equals decoded text.
    """
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
    kwargs = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    base = tokenizer.decode([anchor], **kwargs)
    texts = tokenizer.batch_decode([[anchor, i] for i in range(len(tokenizer))], **kwargs)
    special = set(tokenizer.all_special_ids) | control_ids(tokenizer)
    strings: list[str | None] = []
    for i, text in enumerate(texts):
        piece = text[len(base) :] if text.startswith(base) else ""
        strings.append(piece if piece and i not in special and "\ufffd" not in piece else None)
    return strings


class Vocab:
    """Per-tokenizer tables: token strings, their character trie, one-character tokens, token-cost DP.

    Built once per tokenizer and cached (`vocab_for`). Measured on the 2-core CPU box (loaded): the
    tiny char tokenizer (2.7k tokens) in 25-45 ms; a 110k-token fast tokenizer in 1.4-2.9 s (about
    two thirds decoding the token pairs, the rest the trie). A slow sentencepiece tokenizer decodes
    at 30-40 us per token, so ChatGLM-6B's 130k vocabulary should take ~5 s, once per process.
    """

    def __init__(self, tokenizer):
        self.strings = token_strings(tokenizer)
        self.root: Trie = {}
        self.single: set[str] = set()
        for token_id, text in enumerate(self.strings):
            if text is None:
                continue
            node = self.root
            for ch in text:
                child = node.get(ch)
                if child is None:
                    child = node[ch] = {}
                node = child
            node.setdefault(IDS, []).append(token_id)
            if len(text) == 1:
                self.single.add(text)
        self._prefer_ordinary_pieces(tokenizer)
        self.lead = self._leading_prefix(tokenizer)
        # Byte-fallback pieces that spell the leading prefix: never the first token of an answer.
        lead_ids = self.ids_of(self.lead) if self.lead else []
        pieces = tokenizer.convert_ids_to_tokens(lead_ids)
        self.lead_bytes = frozenset(i for i, piece in zip(lead_ids, pieces, strict=True) if _is_byte_piece(piece))
        self.tok_cost = lru_cache(maxsize=65536)(self._tok_cost)
        self.split = lru_cache(maxsize=65536)(self._split)
        self.spell = lru_cache(maxsize=65536)(self._spell)
        self.skeletons: dict[tuple, Skeleton] = {}  # per-schema automaton parts (see _cached_skeleton)

    def ids_of(self, text: str) -> list[int]:
        """Ids of the tokens whose string is exactly `text`."""
        node = self.root
        for ch in text:
            node = node.get(ch)
            if node is None:
                return []
        return list(node.get(IDS, []))

    def is_atomic(self, ch: str) -> bool:
        return ch in self.single

    def _leading_prefix(self, tokenizer) -> str:
        """What the tokenizer puts before a text it encodes: ' ' for sentencepiece's dummy prefix, else ''.

        The model was trained on answers tokenized that way, so the first answer token may carry it.
        """
        probe = "[" + JSON_FENCE_OPEN
        joined = "".join(self.strings[i] or "" for i in tokenizer.encode(probe, add_special_tokens=False))
        lead = joined[: -len(probe)] if joined.endswith(probe) else ""
        return lead if lead.strip() == "" else ""

    def _prefer_ordinary_pieces(self, tokenizer) -> None:
        """Where several tokens share a string, list first the one a tokenizer would write: not a
        sentencepiece byte-fallback piece ('<0x20>' for ' '), then the lowest id. `split` spells with it."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            ids = node.get(IDS)
            if ids and len(ids) > 1:
                byte = dict(zip(ids, map(_is_byte_piece, tokenizer.convert_ids_to_tokens(ids)), strict=True))
                ids.sort(key=lambda i: (byte[i], i))
            stack.extend(child for ch, child in node.items() if ch != IDS)

    def _tok_cost(self, text: str) -> float:
        """Fewest tokens whose strings concatenate to exactly `text` (inf if none): the length of `split`."""
        ids = self.split(text)
        return INF if ids is None else len(ids)

    def _split(self, text: str) -> tuple[int, ...] | None:
        """Token ids spelling exactly `text` in the fewest tokens (tok_cost of them), None if impossible.

        Among equally short spellings the one with the longest first piece, then the longest second...
        (greedy longest match, what BPE/unigram tokenizers mostly write for JSON punctuation and keys).
        """
        best = [INF] * len(text) + [0]
        piece: list[list[int] | None] = [None] * len(text)
        ends = [0] * len(text)
        for i in range(len(text) - 1, -1, -1):
            node = self.root
            for j in range(i, len(text)):
                node = node.get(text[j])
                if node is None:
                    break
                # <= : a later j (longer piece) wins ties.
                if IDS in node and best[j + 1] + 1 <= best[i]:
                    best[i], piece[i], ends[i] = best[j + 1] + 1, node[IDS], j + 1
        if best[0] == INF:
            return None
        ids, i = [], 0
        while i < len(text):
            ids.append(piece[i][0])
            i = ends[i]
        return tuple(ids)

    def _spell(self, text: str, closed: bool) -> tuple[tuple[int, ...], int]:
        """The tokens of `split(text)` that may be forced, and how many characters they cover.

        Unless the text is the end of the answer (`closed`), stop at the first token boundary where the
        rest of the text is a proper prefix of some token: a token that runs past the text into what
        comes next ('```json\n[{"' after the literal '```json\n[') could start there, and token-by-token
        decoding would let the model pick it. A char vocabulary never stops.
        """
        ids = self.split(text)
        if ids is None:
            return (), 0
        if closed:
            return ids, len(text)
        pos = 0
        for k, token_id in enumerate(ids):
            if self._runs_past(text, pos):
                return ids[:k], pos
            pos += len(self.strings[token_id])
        return ids, pos

    def _runs_past(self, text: str, start: int) -> bool:
        """Whether some token string is text[start:] followed by at least one more character."""
        node = self.root
        for ch in text[start:]:
            node = node.get(ch)
            if node is None:
                return False
        return any(key != IDS for key in node)

    def decode(self, ids: Sequence[int]) -> str:
        """The answer text exactly as the automaton saw it, without the leading dummy-prefix space."""
        # An id past the tokenizer (ChatGLM2/3's output layer has 230 rows no token maps to) adds nothing.
        n = len(self.strings)
        text = "".join((self.strings[i] if 0 <= i < n else None) or "" for i in ids)
        return text[len(self.lead) :] if self.lead and text.startswith(self.lead) else text


def _is_byte_piece(piece: str | None) -> bool:
    return bool(piece) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def text_view(tokenizer, text: str) -> str:
    """The text as the model sees it: what its tokenizer makes of it.

    ChatGLM-6B's tokenizer NFKC-normalises ('（' becomes '(', 'Ⅱ' becomes 'II'), so a model trained on such
    tokens copies spans from this view; `restore_span` maps them back to the text's own characters.
    """
    return decode_answer(tokenizer, tokenizer.encode(text, add_special_tokens=False))


def restore_span(span: str, view: str, text: str) -> str:
    """A span copied from `view`, read in `text`: the same characters where the two agree, the text's own
    where the tokenizer rewrote them. Unchanged if the span is in the text already, or cuts through a
    rewritten piece (the parser then rejects it as not in the text)."""
    if view == text or span in text or span not in view:
        return span
    start = view.find(span)
    end = start + len(span)
    # view position -> text position, at the edges of each aligned block (inside equal blocks too).
    starts, ends = {}, {}
    for tag, t0, t1, v0, v1 in difflib.SequenceMatcher(None, text, view, autojunk=False).get_opcodes():
        if tag == "equal":
            for k in range(v1 - v0 + 1):
                starts.setdefault(v0 + k, t0 + k)
                ends[v0 + k] = t0 + k
        else:
            starts.setdefault(v0, t0)
            ends[v1] = t1
    if start not in starts or end not in ends:
        return span
    return text[starts[start] : ends[end]]


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """The answer text of generated ids, exactly as the automaton accepted it (no dummy-prefix space)."""
    return vocab_for(tokenizer).decode(ids)


_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_VOCABS_LOCK = threading.Lock()


def vocab_for(tokenizer) -> Vocab:
    """The tokenizer's Vocab, built on first use and cached for as long as the tokenizer lives."""
    with _VOCABS_LOCK:
        vocab = _VOCABS.get(tokenizer)
        if vocab is None:
            vocab = _VOCABS[tokenizer] = Vocab(tokenizer)
        return vocab


