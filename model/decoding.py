"""Constrained decoding: every answer is well-formed, even from an untrained model.

A category answer can only be one of the schema's labels in the training format (`["水果"]`);
a triple answer is always the training format ("```json\\n" + a JSON list of
{predicate, object_type, subject_type, object, subject} + "\\n```") with predicates and types
from the schema and subject/object copied verbatim from the input text, and it always closes
within the new-token budget.

How it works
- Each batch row gets a character-level automaton built from its `Constraint`: a small graph of
  CHOICE nodes (emit one of several strings; a literal is a choice of one) and SPAN nodes (copy a
  non-empty substring of the text, tracking every position where the copied string ends), ending
  in END. The automaton state is an immutable tuple, so it can branch cheaply.
- The tokenizer's vocabulary is turned once into a character trie of token strings (`Vocab`,
  cached per tokenizer). Each step, a DFS walks the trie and the automaton together, so it visits
  only token strings that are valid continuations and collects exactly the allowed token ids
  (with the state each would lead to); every other logit becomes -inf.
- Rows are advanced incrementally with the state recorded for the chosen token; nothing is
  re-decoded.
- Budget: `Automaton.cost(state)` is an upper bound on the tokens still needed to finish (before
  the end token) that is reachable one token at a time: each literal piece costs the fewest tokens
  that spell it (DP over the trie), a span costs one single-character token per character. A token
  is allowed only if `cost(state after it) + 1 <= tokens left after it`; since some allowed token
  always lowers the cost by one, an answer can never run into max_new_tokens unfinished. Near the
  end of the budget this leaves only the closing moves: finish the current span, no new triple.
- The schema part of an automaton (its nodes and their static costs, `Skeleton`) is built once per
  schema and vocabulary; only the text tables are built per row.
- Generation (`constrained_generate`): for Llama-like decoder-only models, `JumpForwardDecoder` runs
  its own greedy loop over the KV cache. Tokens that have only one possible value (the JSON
  skeleton, keys, the rest of a label or type once chosen: ~90% of answer tokens) are appended
  without a forward pass of their own; each pass feeds a row's chosen token plus the forced run
  after it. With a char vocabulary it picks exactly the tokens of token-by-token decoding. The prompt
  prefix the rows share (instruction and phrasing) runs once, its KV cache kept for the next batches
  and calls (`PrefixCache`). ChatGLM
  (2D positions and masks built from <sop> in its remote code) and calls with generate() options
  keep HF generate() with GrammarLogitsProcessor, one token per pass (`jump_forward=False` forces it).
"""

from __future__ import annotations

import json
import math
import threading
import time
import weakref
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from finetune.data import JSON_FENCE_CLOSE, JSON_FENCE_OPEN, TRIPLE_KEYS

INF = math.inf
CHOICE, SPAN, END = "choice", "span", "end"
OBJECT, SUBJECT = "object", "subject"
# The triple grammar below spells the keys in this order; fail loudly if the training format changes.
assert TRIPLE_KEYS == ("predicate", "object_type", "subject_type", "object", "subject"), TRIPLE_KEYS


# --------------------------------------------------------------------------- grammar graph


@dataclass(frozen=True)
class Option:
    """One string a CHOICE node may emit, and where the automaton goes once it is complete."""

    text: str
    next: int
    value: str | None = None  # recorded as the next field of the current triple (predicate, a type)
    opens_triple: bool = False  # counted against max_triples


@dataclass(frozen=True)
class Node:
    kind: str  # CHOICE, SPAN or END
    options: tuple[Option, ...] = ()
    next: int = -1  # SPAN: the node entered on the closing quote (its text starts with '"')
    role: str = ""  # SPAN: OBJECT or SUBJECT
    in_triple: bool = False  # inside a triple, before its subject: repeat-ban bound applies


class State(NamedTuple):
    """Where one row is in its automaton. Immutable, so the trie DFS can branch for free."""

    node: int
    off: int = 0  # CHOICE: characters of the options consumed so far
    alive: tuple[int, ...] = ()  # CHOICE: options still matching; SPAN: text positions where `span` ends
    span: str = ""  # SPAN: characters copied so far
    fields: tuple[str, ...] = ()  # values of the current triple so far, in TRIPLE_KEYS order
    emitted: frozenset = frozenset()  # triples (5-tuples) already emitted in this answer


def json_escaped(value: str) -> str:
    """A string as it appears between the quotes of json.dumps(..., ensure_ascii=False)."""
    return json.dumps(value, ensure_ascii=False)[1:-1]


def copyable(ch: str) -> bool:
    """Characters a span may copy: json.dumps writes them as they are (no backslash escape), and no
    whitespace, so no entity is blank or padded with spaces. The cost: the 0.3% of reference spans
    with an inner space ("I Do Believe") cannot be produced whole."""
    return ch not in '"\\' and ord(ch) >= 0x20 and not ch.isspace()


class Automaton:
    """Character-level automaton of one row's answers, with a token-cost bound for the budget rule.

    tok_cost(s) = fewest tokens spelling s (inf if impossible); atomic(ch) = the vocabulary has a
    one-character token ch (spans only copy such characters, so each costs at most one token).
    """

    def __init__(
        self,
        nodes: Sequence[Node],
        start: int,
        text: str = "",
        max_triples: int = 0,
        tok_cost=len,
        atomic=None,
        skeleton: Skeleton | None = None,
    ):
        # The text-independent part (nodes checked prefix-free, static costs) is shared when the caller
        # passes a cached Skeleton built from these very nodes with this tok_cost.
        if skeleton is None or skeleton.nodes is not nodes or skeleton.tok_cost is not tok_cost:
            skeleton = Skeleton(nodes, tok_cost)
        self.nodes = skeleton.nodes
        self.text = text
        self.max_triples = max_triples
        self.tok_cost = tok_cost
        ok = [copyable(ch) and (atomic is None or atomic(ch)) for ch in text]
        # run_end[i]: first position >= i that a span cannot copy, so text[e:e+k] is copyable iff e+k <= run_end[e].
        self._run_end = [len(text)] * (len(text) + 1)
        for i in range(len(text) - 1, -1, -1):
            self._run_end[i] = self._run_end[i + 1] if ok[i] else i
        first: dict[str, list[int]] = {}
        for i, ch in enumerate(text):
            if ok[i]:
                first.setdefault(ch, []).append(i + 1)
        self._first = {ch: tuple(ends) for ch, ends in first.items()}
        self._starts = tuple(i for i in range(len(text)) if ok[i])
        self._lstar = self._shortest_free_subject_lengths(ok)
        self.node_cost = skeleton.static_costs(1 if self._starts else INF)
        self.start = start

    # ---------------------------------------------------------------- transitions

    def initial(self) -> State:
        return self._enter(self.start, (), frozenset())

    def is_final(self, state: State) -> bool:
        return self.nodes[state.node].kind == END

    def successors(self, state: State, keep: Container[str] | None = None) -> Iterator[tuple[str, State]]:
        """(character, next state) for every character the automaton accepts next (only those in `keep`)."""
        node = self.nodes[state.node]
        if node.kind == CHOICE:
            yield from self._choice_successors(state, node, keep)
        elif node.kind == SPAN:
            yield from self._span_successors(state, node, keep)

    def step(self, state: State, ch: str) -> State | None:
        """The state after one character, or None if the character is not allowed."""
        return next((nst for _, nst in self.successors(state, (ch,))), None)

    def feed(self, state: State | None, text: str) -> State | None:
        """The state after a string, or None as soon as a character is not allowed."""
        for ch in text:
            if state is None:
                return None
            state = self.step(state, ch)
        return state

    def accepts(self, text: str) -> bool:
        state = self.feed(self.initial(), text)
        return state is not None and self.is_final(state)

    def is_prefix(self, text: str) -> bool:
        """Whether `text` can still be completed into an accepted answer."""
        state = self.feed(self.initial(), text)
        return state is not None and self.cost(state) < INF

    def _enter(self, node_id: int, fields: tuple[str, ...], emitted: frozenset) -> State:
        node = self.nodes[node_id]
        if node.kind != CHOICE:
            return State(node_id, fields=fields, emitted=emitted)
        full = len(emitted) >= self.max_triples
        alive = tuple(i for i, o in enumerate(node.options) if not (o.opens_triple and full))
        return State(node_id, 0, alive, "", fields, emitted)

    def _complete(self, state: State, option: Option) -> State:
        fields = state.fields + (option.value,) if option.value is not None else state.fields
        return self._enter(option.next, fields, state.emitted)

    def _choice_successors(self, state: State, node: Node, keep) -> Iterator[tuple[str, State]]:
        groups: dict[str, list[int]] = {}
        for i in state.alive:
            ch = node.options[i].text[state.off]
            if keep is None or ch in keep:
                groups.setdefault(ch, []).append(i)
        for ch, idx in groups.items():
            option = node.options[idx[0]]
            # Options are prefix-free, so a completed option is alone in its group.
            if len(idx) == 1 and len(option.text) == state.off + 1:
                yield ch, self._complete(state, option)
            else:
                yield ch, state._replace(off=state.off + 1, alive=tuple(idx))

    def _span_successors(self, state: State, node: Node, keep) -> Iterator[tuple[str, State]]:
        if state.span:
            groups: dict[str, list[int]] = {}
            for end in state.alive:
                if end < self._run_end[end]:
                    ch = self.text[end]
                    if keep is None or ch in keep:
                        groups.setdefault(ch, []).append(end + 1)
            items = groups.items()
        else:
            items = ((ch, ends) for ch, ends in self._first.items() if keep is None or ch in keep)
        for ch, ends in items:
            yield ch, state._replace(alive=tuple(ends), span=state.span + ch)
        if state.span and (keep is None or '"' in keep) and self._may_close(state, node):
            yield '"', self._close(state, node)

    def _may_close(self, state: State, node: Node) -> bool:
        return node.role != SUBJECT or state.span not in self._forbidden_subjects(state)

    def _close(self, state: State, node: Node) -> State:
        fields = state.fields + (state.span,)
        emitted = state.emitted
        if node.role == SUBJECT:
            emitted, fields = emitted | {fields}, ()
        # The literal after a span begins with the closing quote.
        entered = self._enter(node.next, fields, emitted)
        return next(nst for _, nst in self._choice_successors(entered, self.nodes[node.next], ('"',)))

    def _forbidden_subjects(self, state: State) -> set[str]:
        """Subjects that would repeat an emitted triple, given the current triple's other four fields."""
        return {t[4] for t in state.emitted if t[:4] == state.fields}

    # ---------------------------------------------------------------- costs (token budget)

    def cost(self, state: State) -> float:
        """Upper bound on the tokens needed to finish from `state` (end token excluded), inf if it cannot finish.

        Reachable: some next token lowers it by at least one, which is what the budget rule relies on.
        """
        node = self.nodes[state.node]
        if node.kind == END:
            return 0
        if node.kind == CHOICE:
            best = INF
            for i in state.alive:
                option = node.options[i]
                c = self.tok_cost(option.text[state.off :])
                if c >= best:
                    continue
                fields = state.fields + (option.value,) if option.value is not None else state.fields
                best = min(best, c + self._entry_cost(option.next, fields, state.emitted))
            return best
        if node.role == SUBJECT:
            return self._min_extension(state) + self.node_cost[node.next]
        if state.span:  # an object that may close now
            return self.node_cost[node.next] + self._extra(state.fields + (state.span,), state.emitted)
        return self.node_cost[state.node] + self._extra(state.fields, state.emitted)

    def _entry_cost(self, node_id: int, fields: tuple[str, ...], emitted: frozenset) -> float:
        node = self.nodes[node_id]
        if node.kind == SPAN and node.role == SUBJECT:
            return self._min_extension(State(node_id, fields=fields, emitted=emitted)) + self.node_cost[node.next]
        if node.in_triple:
            return self.node_cost[node_id] + self._extra(fields, emitted)
        return self.node_cost[node_id]

    def _extra(self, fields: tuple[str, ...], emitted: frozenset) -> float:
        """Extra subject characters the repeat ban may force on a triple that starts with `fields`.

        Bounded by counting emitted triples that share these fields: with F of them, some subject of
        length lstar[F] is still free (there are more than F distinct substrings that short).
        """
        if not emitted:
            return 0
        n_match = sum(1 for t in emitted if t[: len(fields)] == fields)
        return self._lstar[n_match] - 1

    def _min_extension(self, state: State) -> float:
        """Fewest characters a subject span must still copy before it may close (exact)."""
        forbidden = self._forbidden_subjects(state) if state.emitted else set()
        ends = state.alive if state.span else self._starts
        first_k = 0 if state.span else 1
        # Each forbidden string has one length, so among len(forbidden) + 1 lengths one is free.
        for k in range(first_k, first_k + len(forbidden) + 1):
            any_candidate = False
            for end in ends:
                if end + k <= self._run_end[end]:
                    any_candidate = True
                    if state.span + self.text[end : end + k] not in forbidden:
                        return k
            if not any_candidate:
                return INF  # the text ends (or hits an uncopyable character) everywhere
        return INF

    def _shortest_free_subject_lengths(self, ok: list[bool]) -> list[float]:
        """lstar[F]: smallest L with more than F distinct copyable substrings of length <= L."""
        lstar: list[float] = []
        distinct = 0
        length = 0
        for n_forbidden in range(self.max_triples + 1):
            while distinct <= n_forbidden and length < self.max_triples + 1:
                length += 1
                distinct += len({self.text[i : i + length] for i in self._starts_of_length(ok, length)})
            lstar.append(length if distinct > n_forbidden else INF)
        return lstar

    def _starts_of_length(self, ok: list[bool], length: int) -> list[int]:
        return [i for i in range(len(self.text) - length + 1) if i + length <= self._run_end[i] and ok[i]]


class Skeleton:
    """The text-independent part of an automaton: its nodes (checked prefix-free once) and, per smallest
    span cost (1, or inf for a text with nothing copyable), the fewest tokens from each node to the end.

    A schema's skeleton is the same for every row, so constraints cache it per Vocab (`Vocab.skeletons`):
    building it was 3-5% of labelling time when it was rebuilt for each row.
    """

    def __init__(self, nodes: Sequence[Node], tok_cost=len):
        self.nodes = tuple(nodes)
        self.tok_cost = tok_cost
        for node in self.nodes:
            _check_prefix_free([o.text for o in node.options])
        self._costs: dict[float, tuple[float, ...]] = {}

    def static_costs(self, span_min: float) -> tuple[float, ...]:
        costs = self._costs.get(span_min)
        if costs is None:
            costs = self._costs[span_min] = tuple(self._static_costs(span_min))
        return costs

    def _static_costs(self, span_min: float) -> list[float]:
        """Fewest tokens from entering each node to the end, ignoring the repeat ban (Bellman-Ford: the
        triple list is a cycle, but its cheapest exit is always closing the list)."""
        cost = [INF] * len(self.nodes)
        for _ in range(len(self.nodes) + 1):
            changed = False
            for i, node in enumerate(self.nodes):
                if node.kind == END:
                    new = 0
                elif node.kind == SPAN:
                    new = span_min + cost[node.next]
                else:
                    new = min((self.tok_cost(o.text) + cost[o.next] for o in node.options), default=INF)
                if new < cost[i]:
                    cost[i], changed = new, True
            if not changed:
                break
        return cost


def _check_prefix_free(texts: list[str]) -> None:
    """A choice must never be able to end and go on at once; closing quotes make schema strings prefix-free."""
    ordered = sorted(set(texts))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.startswith(a):
            raise ValueError(f"choice options are not prefix-free: {a!r} is a prefix of {b!r}")
    if len(ordered) != len(texts):
        raise ValueError(f"duplicate choice options in {texts}")


def _start_node(texts_and_next: list[tuple[str, int]], lead: str) -> Node:
    """The first node, also accepting the tokenizer's leading dummy-prefix space (sentencepiece's '▁')."""
    options = [Option(text, nxt) for text, nxt in texts_and_next]
    if lead:
        options += [Option(lead + text, nxt) for text, nxt in texts_and_next]
    return Node(CHOICE, tuple(options))


# --------------------------------------------------------------------------- constraints


class Constraint:
    """What one row's answer may be. `automaton(vocab)` compiles it for a tokenizer (None: plain characters)."""

    def automaton(self, vocab: Vocab | None = None) -> Automaton:
        raise NotImplementedError


def _cached_skeleton(vocab: Vocab | None, key: tuple, build) -> Skeleton:
    """The Skeleton of `build(lead)` for this vocabulary, built once per key (always afresh without a vocab)."""
    if vocab is None:
        return Skeleton(build(""), len)
    skeleton = vocab.skeletons.get(key)
    if skeleton is None:
        skeleton = Skeleton(build(vocab.lead), vocab.tok_cost)
        if len(vocab.skeletons) >= 64:  # a process serves a handful of schemas; never grow without bound
            vocab.skeletons.clear()
        vocab.skeletons[key] = skeleton
    return skeleton


def _vocab_kwargs(vocab: Vocab | None) -> dict:
    if vocab is None:
        return {"tok_cost": len, "atomic": None}
    return {"tok_cost": vocab.tok_cost, "atomic": vocab.is_atomic}


class CategoryConstraint(Constraint):
    """The answer is exactly json.dumps([label], ensure_ascii=False) for one of `labels`."""

    def __init__(self, labels: Sequence[str]):
        labels = list(dict.fromkeys(labels))
        if not labels or not all(isinstance(label, str) and label for label in labels):
            raise ValueError(f"CategoryConstraint needs non-empty string labels, got {labels!r}")
        self.labels = labels

    def automaton(self, vocab: Vocab | None = None) -> Automaton:
        skeleton = _cached_skeleton(vocab, ("category", tuple(self.labels)), self._nodes)
        return Automaton(skeleton.nodes, start=0, skeleton=skeleton, **_vocab_kwargs(vocab))

    def _nodes(self, lead: str) -> list[Node]:
        answers = [(json.dumps([label], ensure_ascii=False), 1) for label in self.labels]
        return [_start_node(answers, lead), Node(END)]


class TripleConstraint(Constraint):
    """The answer is the training triple format, with schema predicates/types and spans copied from `text`."""

    def __init__(self, schema: dict, text: str, max_triples: int = 16):
        predicates = schema.get("predicates") if isinstance(schema, dict) else None
        if not isinstance(predicates, dict) or not predicates:
            raise ValueError("schema has no 'predicates': was it written by finetune.data.derive_schema?")
        for name, entry in predicates.items():
            if not name or not entry.get("subject_type") or not entry.get("object_type"):
                raise ValueError(f"schema predicate {name!r} lacks subject_type/object_type lists")
        if max_triples < 0:
            raise ValueError(f"max_triples must be >= 0, got {max_triples}")
        self.predicates = predicates
        self.text = text
        self.max_triples = max_triples

    def automaton(self, vocab: Vocab | None = None) -> Automaton:
        """The schema part (every node) is built once per schema and vocabulary; only the text tables per row."""
        key = tuple((name, tuple(e["object_type"]), tuple(e["subject_type"])) for name, e in self.predicates.items())
        skeleton = _cached_skeleton(vocab, ("triple", key), self._nodes)
        return Automaton(
            skeleton.nodes,
            start=1,
            text=self.text,
            max_triples=self.max_triples,
            skeleton=skeleton,
            **_vocab_kwargs(vocab),
        )

    def _nodes(self, lead: str) -> list[Node]:
        end, start, list_open, list_more, pred, obj, after_obj, subj, after_subj = range(9)
        close_list = "]" + JSON_FENCE_CLOSE
        new_triple = '{"predicate": "'
        nodes: list[Node] = [Node(END)] * 9
        nodes[start] = _start_node([(JSON_FENCE_OPEN + "[", list_open)], lead)
        nodes[list_open] = Node(CHOICE, (Option(close_list, end), Option(new_triple, pred, opens_triple=True)))
        nodes[list_more] = Node(CHOICE, (Option(close_list, end), Option(", " + new_triple, pred, opens_triple=True)))
        pred_options = []
        for name, entry in self.predicates.items():
            # One object_type node and one subject_type node per predicate: types stay consistent with it.
            ot_node, st_node = len(nodes), len(nodes) + 1
            ot_options = [
                Option(json_escaped(t) + '", "subject_type": "', st_node, value=t)
                for t in dict.fromkeys(entry["object_type"])
            ]
            st_options = [
                Option(json_escaped(t) + '", "object": "', obj, value=t) for t in dict.fromkeys(entry["subject_type"])
            ]
            nodes += [Node(CHOICE, tuple(ot_options), in_triple=True), Node(CHOICE, tuple(st_options), in_triple=True)]
            pred_options.append(Option(json_escaped(name) + '", "object_type": "', ot_node, value=name))
        nodes[pred] = Node(CHOICE, tuple(pred_options), in_triple=True)
        nodes[obj] = Node(SPAN, next=after_obj, role=OBJECT, in_triple=True)
        nodes[after_obj] = Node(CHOICE, (Option('", "subject": "', subj),), in_triple=True)
        nodes[subj] = Node(SPAN, next=after_subj, role=SUBJECT)
        nodes[after_subj] = Node(CHOICE, (Option('"}', list_more),))
        assert start == 1  # automaton() relies on it
        return nodes


# --------------------------------------------------------------------------- vocabulary trie


# The vocabulary trie is nested dicts keyed by character; the key IDS ('', never a character)
# holds the ids of the tokens that end at that node. Plain dicts build ~3x faster than node objects.
IDS = ""
Trie = dict


def token_strings(tokenizer) -> list[str | None]:
    """The text each token adds to a decoded sequence (None: special, empty or partial UTF-8 byte tokens).

    decode([anchor, id]) minus decode([anchor]) keeps what decoding one token alone would lose:
    sentencepiece's '▁' as a space, '<n>' as a newline; concatenating these strings equals decoded text.
    """
    anchor = tokenizer.encode("a", add_special_tokens=False)[-1]
    kwargs = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    base = tokenizer.decode([anchor], **kwargs)
    texts = tokenizer.batch_decode([[anchor, i] for i in range(len(tokenizer))], **kwargs)
    special = set(tokenizer.all_special_ids)
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
        self.tok_cost = lru_cache(maxsize=65536)(self._tok_cost)
        self.split = lru_cache(maxsize=65536)(self._split)
        self.spell = lru_cache(maxsize=65536)(self._spell)
        self.skeletons: dict[tuple, Skeleton] = {}  # per-schema automaton parts (see _cached_skeleton)

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
        """Fewest tokens whose strings concatenate to exactly `text` (inf if none)."""
        best = [INF] * len(text) + [0]
        for i in range(len(text) - 1, -1, -1):
            node = self.root
            for j in range(i, len(text)):
                node = node.get(text[j])
                if node is None:
                    break
                if IDS in node and best[j + 1] + 1 < best[i]:
                    best[i] = best[j + 1] + 1
        return best[0]

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
        text = "".join(self.strings[i] or "" for i in ids)
        return text[len(self.lead) :] if self.lead and text.startswith(self.lead) else text


def _is_byte_piece(piece: str | None) -> bool:
    return bool(piece) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


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


# --------------------------------------------------------------------------- logits processor


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks every token that would leave a row's automaton, or its budget, to -inf.

    One constraint per batch row (greedy or sampling, no beams); prompt_length is the padded
    prompt width, so the row's generated tokens are input_ids[:, prompt_length:].
    """

    def __init__(
        self,
        tokenizer,
        constraints: list[Constraint],
        prompt_length: int,
        max_new_tokens: int,
        end_token_id: int,
    ):
        self.vocab = vocab_for(tokenizer)
        self.automata = [c.automaton(self.vocab) for c in constraints]
        self.states: list[State | None] = [a.initial() for a in self.automata]  # None: row is finished
        self.pending: list[dict[int, State]] = [{} for _ in constraints]
        self.counts = [0] * len(constraints)  # tokens each row has generated so far
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.end_token_id = end_token_id
        self.consumed = 0
        self.step_seconds: list[float] = []  # wall time of each call, for measurements

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """scores: (batch, vocab) next-token logits; returns them with every disallowed token at -inf."""
        started = time.perf_counter()
        if input_ids.shape[0] != len(self.automata):
            raise ValueError(f"batch has {input_ids.shape[0]} rows but {len(self.automata)} constraints (no beams)")
        generated = input_ids.shape[1] - self.prompt_length
        self._advance(input_ids, generated)
        remaining = self.max_new_tokens - generated
        rows: list[int] = []
        cols: list[int] = []
        counts: list[int] = []
        free_rows = []
        for row, state in enumerate(self.states):
            if state is None:
                free_rows.append(row)  # finished: generate() overwrites its token with padding anyway
                continue
            self.pending[row] = self._allowed(row, state, remaining)
            ids = list(self.pending[row])
            if not ids:  # final state, or no way to finish: the end token is the only move
                ids = [self.end_token_id]
            rows += [row] * len(ids)
            cols += ids
            counts.append(len(ids))
        index = (torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device))
        values = scores[index]
        if torch.isneginf(values).any():
            values = _revive(values, counts)
        masked = torch.full_like(scores, -INF)
        masked[index] = values
        masked[free_rows] = scores[free_rows]
        self.step_seconds.append(time.perf_counter() - started)
        return masked

    def _advance(self, input_ids: torch.LongTensor, generated: int) -> None:
        """Fold the tokens chosen since the last call into each row's state."""
        if generated <= self.consumed:
            return
        new = input_ids[:, self.prompt_length + self.consumed : self.prompt_length + generated].tolist()
        for row, tokens in enumerate(new):
            for token in tokens:
                state = self.states[row]
                if state is None:
                    break
                if token == self.end_token_id:
                    self.states[row] = None
                    continue
                self.counts[row] += 1
                nxt = self.pending[row].get(token)
                if nxt is None:  # not chosen through this processor (another one overrode it): spell it out
                    nxt = self.automata[row].feed(state, self.vocab.strings[token] or "\0")
                self.states[row] = nxt if nxt is not None else None
                self.pending[row] = {}
        self.consumed = generated

    def _allowed(self, row: int, state: State, remaining: int) -> dict[int, State]:
        automaton = self.automata[row]
        if automaton.is_final(state):
            return {}
        # This token and the end token must both still fit after the cheapest way to finish.
        allowed = self._collect(automaton, state, remaining - 2)
        if not allowed:
            # max_new_tokens is below even the shortest answer: still make progress towards it.
            allowed = self._collect(automaton, state, automaton.cost(state) - 1)
        if self.counts[row] == 0 and self.vocab.lead:
            # The dummy-prefix space may only come inside a longer first piece ('▁```'), which decode()
            # drops; a lone space token (sentencepiece's '<0x20>' byte) would decode to a real space.
            allowed = {i: st for i, st in allowed.items() if self.vocab.strings[i] != self.vocab.lead}
        return allowed

    def _collect(self, automaton: Automaton, state: State, budget: float) -> dict[int, State]:
        """DFS over the vocabulary trie and the automaton together: token id -> state after it."""
        out: dict[int, State] = {}
        stack = [(self.vocab.root, state)]
        while stack:
            trie_node, st = stack.pop()
            for ch, nst in automaton.successors(st, trie_node):
                child = trie_node[ch]
                ids = child.get(IDS)
                if ids and automaton.cost(nst) <= budget:
                    for token_id in ids:
                        if token_id != self.end_token_id:
                            out[token_id] = nst
                if len(child) > (ids is not None):
                    stack.append((child, nst))
        return out


def _revive(values: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Give 0 to the allowed tokens of a row whose allowed tokens all have -inf scores (an earlier
    processor banned them all); otherwise greedy argmax would pick token 0 from an all -inf row."""
    values = values.clone()
    start = 0
    for n in counts:
        if torch.isneginf(values[start : start + n]).all():
            values[start : start + n] = 0
        start += n
    return values


# --------------------------------------------------------------------------- generation


def _answers(sequences: torch.Tensor, prompt_length: int, end_token_id: int, pad_token_id: int) -> list[list[int]]:
    """Generated ids per row, cut at the end token (generate() pads finished rows after it)."""
    out = []
    for row in sequences[:, prompt_length:].tolist():
        cut = len(row)
        for i, token in enumerate(row):
            if token == end_token_id or token == pad_token_id:
                cut = i
                break
        out.append(row[:cut])
    return out


# Generation settings of a model's generation_config that change which token greedy decoding picks
# (value = the neutral default). HF generate() applies them on its own; the jump-forward loop does not,
# so a model that sets any of them is decoded through generate() instead.
_LOGITS_SETTINGS = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_decoder_ids": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
}


def jump_forward_unsupported(model) -> str | None:
    """Why `model` must be decoded through HF generate() + GrammarLogitsProcessor (None: jump-forward works).

    Jump-forward needs a decoder-only model whose forward takes input_ids, a 2D attention_mask over past +
    new tokens, position_ids and past_key_values (Llama-like). ChatGLM-6B (model_type 'chatglm', also
    ChatGLM2/3) builds its own 2D position ids and prefix-bidirectional mask from the <sop> token inside
    its remote code; feeding it several tokens after the cache cannot be reproduced safely here.
    """
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) == "chatglm":
        return "ChatGLM builds its 2D position ids and attention mask from <sop> in its own code"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder model"
    generation_config = getattr(model, "generation_config", None)
    for name, neutral in _LOGITS_SETTINGS.items():
        if getattr(generation_config, name, neutral) not in (neutral, None, [], ()):
            return f"its generation_config sets {name}, which only generate() applies"
    return None


def constrained_generate(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    constraints: list[Constraint],
    max_new_tokens: int,
    end_token_id: int,
    pad_token_id: int,
    jump_forward: bool | None = None,
    prefix_cache: bool = True,
    **generate_kwargs,
) -> list[list[int]]:
    """Greedy generation of a LEFT-padded batch, one constraint per row; answer ids without prompt or end token.

    jump_forward: None (default) = the jump-forward loop (`JumpForwardDecoder`) when the model supports it
    (`jump_forward_unsupported`) and no generate() options are given, else HF generate() with the
    GrammarLogitsProcessor, one token per forward pass (always the case for ChatGLM); True = require
    jump-forward; False = always generate().
    prefix_cache: let jump-forward run the prompt prefix its rows share once (`PrefixCache`); False = each
    row's whole prompt goes through the first pass.
    """
    processor = GrammarLogitsProcessor(tokenizer, constraints, input_ids.shape[1], max_new_tokens, end_token_id)
    reason = jump_forward_unsupported(model) or (
        f"generate() options {sorted(generate_kwargs)}" if generate_kwargs else None
    )
    if jump_forward is None:
        jump_forward = reason is None
    if jump_forward:
        if reason is not None:
            raise ValueError(f"jump-forward decoding is not available: {reason}")
        decoder = JumpForwardDecoder(model, processor, max_new_tokens, pad_token_id, prefix_cache=prefix_cache)
        return decoder.run(input_ids, attention_mask)
    return _greedy_generate(
        model, input_ids, attention_mask, max_new_tokens, end_token_id, pad_token_id,
        logits_processor=LogitsProcessorList([processor]), **generate_kwargs,
    )


FEED_POLICIES = ("auto", "all", "median")


def feed_width(queued: list[int], policy: str) -> int:
    """How many queued tokens each row may feed in the next jump-forward pass (every row is padded to it).

    Rows reach their runs out of step: one copies a span character (one token) while another has just
    chosen a predicate and has ~60 forced tokens to feed.
    - "all": the longest queue, whole. Fewest passes; the right choice where a pass costs about the same
      whatever it feeds (a GPU decoding a big model at a small batch: weight reads dominate). Not measured
      here: no GPU.
    - "median": the lower median queue. A long run goes on over the passes the other rows need anyway for
      their own choices, instead of padding them all to its length. On a CPU a pass costs in proportion to
      the tokens it feeds, pads included: on bench.label_throughput's model (extraction of 200 dev texts,
      batches of 8, after the first pass) "all" fed 39.4k tokens for 19.0k real ones in 264 passes,
      "median" 22.0k in 374 passes; 1.29 s -> 0.95 s, same answers (bench/README.md).
    "auto" (JumpForwardDecoder's default) = "median" on a CPU, else "all".
    """
    if policy == "all":
        return max(queued)
    ordered = sorted(queued)
    return ordered[(len(ordered) - 1) // 2]


class JumpForwardDecoder:
    """Constrained greedy decoding that feeds forced tokens without a forward pass of their own.

    Most answer tokens have only one possible value (the JSON skeleton, keys, the rest of a label or
    type once its first characters are chosen). Each forward pass feeds, per row, the token chosen from
    the previous pass plus the run of forced tokens after it, and the next token is picked greedily,
    among the allowed ones, from the logits at the row's last fed position. A token is forced when
    - the automaton is inside literal text (a choice with one live option): the option's rest is
      spelled with its cheapest token split (`Vocab.split`: exactly the tokens `tok_cost` charged to the
      budget), one option after the other. Where a token could run past the literal into what follows
      ('```json\n[{"' when the literal ends at '[') and the grammar allows one, that boundary is left
      to the model (`Vocab.spell`), as token-by-token decoding would;
    - or exactly one token is allowed (what GrammarLogitsProcessor would leave: e.g. the budget only
      lets a span close);
    - or none is: the end token, which finishes the row without being fed.
    With a vocabulary where each literal character has one token (the tiny char models) this picks
    exactly the tokens of token-by-token decoding. With multi-character tokens, token-by-token decoding
    lets the model choose among the splits of a literal (' "' or ' ' + '"'); this spells the cheapest,
    so answers may differ (always valid, in budget).

    The budget rule is unchanged (forced tokens count like any other: a row stops at max_new_tokens).
    The first pass feeds the left-padded prompts plus each row's first forced run (positions =
    cumsum(attention_mask) - 1, pads at 1, as generate() builds them). Later passes feed each row up to
    `feed_width` of its queued tokens (the chosen one and the forced run after it), left-padded and masked;
    a row that has not fed its whole queue takes no decision in that pass. Finished rows leave the batch and
    the cache.

    Shared prompt prefix (prefix_cache=True): the rows of a batch start with the same instruction and
    phrasing (~75 tokens), and so do the batches of a predict() call. The first pass then starts from the
    cache of that prefix (run once, batch 1, and kept in `PREFIX_CACHE` for the next calls), expanded to
    the batch, and feeds only the rest of each prompt: left-padded, so the pads sit between the prefix and
    the row's own tokens, masked out, and positions still come from the cumulative mask.
    """

    def __init__(
        self,
        model,
        processor: GrammarLogitsProcessor,
        max_new_tokens: int,
        pad_token_id: int,
        prefix_cache: bool = True,
        feed: str = "auto",
    ):
        if feed not in FEED_POLICIES:
            raise ValueError(f"feed must be one of {FEED_POLICIES}, not {feed!r}")
        self.model = model
        self.p = processor
        self.max_new_tokens = max_new_tokens
        self.pad_token_id = pad_token_id
        self.prefix_cache = prefix_cache
        self.feed = feed
        self.out: list[list[int]] = [[] for _ in processor.automata]
        self.passes = 0  # forward passes run, for measurements
        self.fed = self.padding = 0  # tokens fed after the first pass, and the pads among them
        self.prefix_length = 0  # prompt tokens taken from the shared-prefix cache in the first pass
        self.head = _split_head(model)

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
        if input_ids.shape[0] != len(self.out):
            raise ValueError(f"batch has {input_ids.shape[0]} rows but {len(self.out)} constraints")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = input_ids.device
        active = [row for row in range(len(self.out)) if self._force(row)]
        if not active:
            return self.out
        # First pass: each row's prompt (with its own padding) and its first forced run, aligned on the right.
        extra = max(len(self.out[row]) for row in active)
        width = input_ids.shape[1] + extra
        ids = torch.full((len(active), width), self.pad_token_id, dtype=input_ids.dtype, device=device)
        mask = torch.zeros((len(active), width), dtype=attention_mask.dtype, device=device)
        for i, row in enumerate(active):
            run = self.out[row]
            start = extra - len(run)
            ids[i, start : start + input_ids.shape[1]] = input_ids[row]
            mask[i, start : start + input_ids.shape[1]] = attention_mask[row]
            if run:
                ids[i, width - len(run) :] = torch.tensor(run, dtype=ids.dtype, device=device)
                mask[i, width - len(run) :] = 1
        past = None
        queue: dict[int, list[int]] = {}  # per row, chosen and forced tokens not fed yet
        # inference_mode skips autograd's bookkeeping on every op. Only here, not around generate(): ChatGLM-6B
        # fills its rotary cache lazily on a first forward, and tensors made in inference mode could not be
        # used by a later training step in the same process.
        with torch.inference_mode():
            if self.prefix_cache:
                ids, mask, past = self._start_from_prefix(ids, mask, input_ids, attention_mask, active)
            while True:
                logits, past = self._forward(ids, mask, past)
                # Rows that fed their whole queue are at a decision; the others go on feeding next pass.
                ready = [i for i, row in enumerate(active) if not queue.get(row)]
                queue.update(self._decide([active[i] for i in ready], logits[ready]))
                keep = [i for i, row in enumerate(active) if queue[row]]
                if not keep:
                    return self.out
                if len(keep) < len(active):
                    past, mask, active = self._shrink(past, mask, keep), mask[keep], [active[i] for i in keep]
                # Next pass: up to `width` queued tokens per row, left-padded.
                width = feed_width([len(queue[row]) for row in active], self._policy(device))
                fed = []
                for row in active:
                    fed.append(queue[row][:width])
                    queue[row] = queue[row][width:]
                self.fed += width * len(active)
                self.padding += sum(width - len(f) for f in fed)
                ids = torch.tensor([[self.pad_token_id] * (width - len(f)) + f for f in fed], device=device)
                new_mask = torch.tensor([[0] * (width - len(f)) + [1] * len(f) for f in fed], device=device)
                mask = torch.cat([mask, new_mask.to(mask.dtype)], dim=1)

    def _policy(self, device: torch.device) -> str:
        if self.feed != "auto":
            return self.feed
        return "median" if device.type == "cpu" else "all"

    # ---------------------------------------------------------------- grammar side

    def _force(self, row: int) -> bool:
        """Append the row's forced tokens; True if it then needs a choice (its allowed set is in p.pending)."""
        p, out = self.p, self.out[row]
        automaton = p.automata[row]
        while True:
            state = p.states[row]
            room = self.max_new_tokens - len(out)
            if state is None or room <= 0 or automaton.is_final(state):  # the end token, or out of budget
                p.states[row] = None
                return False
            allowed = None
            literal = self._literal(row, state)
            if literal is not None:
                text, after = literal
                tokens, n_chars = p.vocab.spell(text, automaton.is_final(after))
                if not tokens:
                    # A token running past the literal could start here: a choice if the grammar allows one.
                    allowed = p._allowed(row, state, room)
                    spelled = p.vocab.split(text)
                    if spelled and allowed and all(len(p.vocab.strings[t]) <= len(text) for t in allowed):
                        tokens = spelled[:1]
                        n_chars = len(p.vocab.strings[tokens[0]])
                if tokens:
                    out += tokens[:room]
                    p.counts[row] += min(room, len(tokens))
                    if len(tokens) > room:
                        p.states[row] = None
                    else:
                        p.states[row] = after if n_chars == len(text) else automaton.feed(state, text[:n_chars])
                    continue
            if allowed is None:
                allowed = p._allowed(row, state, room)
            if len(allowed) == 1:
                ((token, nxt),) = allowed.items()
                out.append(token)
                p.counts[row] += 1
                p.states[row] = nxt
                continue
            if not allowed:  # no way on: the end token
                p.states[row] = None
                return False
            p.pending[row] = allowed
            return True

    def _literal(self, row: int, state: State) -> tuple[str, State] | None:
        """(the rest of the literal the row is in, the state after it), if it is inside one.

        One node's option at a time, so the tokens spent on it are exactly what Automaton.cost charged."""
        p = self.p
        if p.counts[row] == 0 and p.vocab.lead:
            return None  # the first token follows _allowed's rule about the dummy-prefix space
        automaton = p.automata[row]
        node = automaton.nodes[state.node]
        if node.kind != CHOICE or len(state.alive) != 1:
            return None
        option = node.options[state.alive[0]]
        return option.text[state.off :], automaton._complete(state, option)

    def _decide(self, active: list[int], logits: torch.Tensor) -> dict[int, list[int]]:
        """Pick each row's token greedily among its allowed ones; return what each row feeds next ([]: done).

        Ties go to the lowest id and rows whose allowed tokens all score -inf take the lowest allowed id,
        exactly as argmax over GrammarLogitsProcessor's masked scores does.
        """
        if not active:
            return {}
        p = self.p
        choices = [sorted(p.pending[row]) for row in active]
        rows = [i for i, ids in enumerate(choices) for _ in ids]
        cols = [token for ids in choices for token in ids]
        index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        values = logits[index].tolist()  # a few floats per row: Python beats a tensor op per row here
        feeds: dict[int, list[int]] = {}
        start = 0
        for row, ids in zip(active, choices, strict=True):
            scores = values[start : start + len(ids)]
            start += len(ids)
            # max() keeps the first of equal scores (the lowest id, as argmax does), also when all are -inf.
            token = ids[max(range(len(ids)), key=scores.__getitem__)]
            self.out[row].append(token)
            p.counts[row] += 1
            p.states[row] = p.pending[row][token]
            p.pending[row] = {}
            before = len(self.out[row]) - 1
            feeds[row] = self.out[row][before:] if self._force(row) else []
        return feeds

    # ---------------------------------------------------------------- model side

    def _start_from_prefix(self, ids, mask, input_ids, attention_mask, active):
        """The first pass's (ids, mask, cache) when the active rows' prompts share a cached prefix; else as given.

        The prefix stops one token short of the shortest prompt, so every row feeds at least one token of
        its own (its logits are read at its last column).
        """
        rows = []
        for row in active:
            real = attention_mask[row].nonzero().flatten()
            if len(real) == 0 or int(real[0]) + len(real) != input_ids.shape[1]:
                return ids, mask, None  # not left-padded: keep the plain first pass
            rows.append(input_ids[row, int(real[0]) :].tolist())
        shortest = min(len(r) for r in rows)
        common = 0
        first = rows[0]
        while common < shortest - 1 and all(r[common] == first[common] for r in rows):
            common += 1
        found = PREFIX_CACHE.get(self, tuple(first[:common]), len(rows) > 1, input_ids.device)
        if found is None:
            return ids, mask, None
        length, prefix_past = found
        self.prefix_length = length
        # Each row without the prefix (prompt rest + its first forced run), left-padded to the longest.
        tails = []
        for i in range(len(active)):
            real = mask[i].nonzero().flatten()
            tails.append((ids[i, int(real[0]) + length :], mask[i, int(real[0]) + length :]))
        width = max(len(t) for t, _ in tails)
        new_ids = torch.full((len(active), width), self.pad_token_id, dtype=ids.dtype, device=ids.device)
        new_mask = torch.zeros((len(active), length + width), dtype=mask.dtype, device=mask.device)
        new_mask[:, :length] = 1
        for i, (tail_ids, tail_mask) in enumerate(tails):
            new_ids[i, width - len(tail_ids) :] = tail_ids
            new_mask[i, length + width - len(tail_mask) :] = tail_mask
        past = tuple(tuple(t.expand(len(active), *t.shape[1:]) for t in layer) for layer in prefix_past)
        return new_ids, new_mask, past

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, past) -> tuple[torch.Tensor, object]:
        """Logits (float) at each row's last column, and the new cache."""
        self.passes += 1
        width = ids.shape[1]
        positions = mask.long().cumsum(-1)[:, -width:] - 1
        positions = positions.masked_fill(mask[:, -width:] == 0, 1)
        kwargs = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "past_key_values": past,
            "use_cache": True,
            "return_dict": True,
        }
        if self.head is not None:  # only the last position goes through the output layer
            base, head = self.head
            outputs = base(**kwargs)
            logits = head(outputs.last_hidden_state[:, -1, :]).float()
        else:
            outputs = self.model(**kwargs)
            logits = outputs.logits[:, -1, :].float()
        return logits, outputs.past_key_values

    @staticmethod
    def _shrink(past, mask: torch.Tensor, keep: list[int]):
        """The cache of the rows in `keep` (legacy tuple cache: per layer (key, value), batch first)."""
        index = torch.tensor(keep, device=mask.device)
        shrunk = []
        for layer in past:
            if not all(isinstance(t, torch.Tensor) and t.shape[0] == mask.shape[0] for t in layer):
                raise ValueError("jump-forward decoding needs a per-layer (key, value) cache with batch first")
            shrunk.append(tuple(t.index_select(0, index) for t in layer))
        return tuple(shrunk)


class PrefixCache:
    """KV caches of prompt prefixes (batch 1), least recently used out, per model object.

    A batch's rows share their prompt up to the text (instruction, phrasing); so do the batches of a call and
    the calls of a task. `get` returns the longest cached prefix of the batch's common prefix, after running
    (and caching) a longer one when that is worth a pass of its own:
    - the common part of this batch's prefix and a cached one that it does not extend: the part that every
      call shares (the template), found as soon as two batches differ in their first text characters;
    - else, for a batch of several rows, its whole common prefix when it is at least `min_extend` tokens
      longer than the cached one (the first batch of a task, whose phrasing no cached prefix holds yet).
    A single row's whole prompt is never cached when a cached prefix serves it (nothing else would reuse it).
    An entry belongs to one model object, dtype and device and to its weights' in-place version counters, so
    it is never used after the model changes.
    """

    def __init__(self, size: int = 4, min_length: int = 4, min_extend: int = 8):
        self.size = size
        self.min_length = min_length
        self.min_extend = min_extend
        self._lock = threading.Lock()
        self._entries: list[tuple[object, tuple, tuple[int, ...], tuple]] = []  # (model ref, stamp, ids, cache)
        self.hits = self.runs = 0  # for measurements and tests

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _stamp(model) -> tuple:
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        first = params[0] if params else None
        return (
            None if first is None else (first.dtype, first.device),
            sum(p._version for p in params),
        )

    def get(self, decoder: JumpForwardDecoder, prefix: tuple[int, ...], several_rows: bool, device):
        """(prefix length, its cache: per layer (key, value), batch 1) to start `decoder`'s first pass, or None."""
        if len(prefix) < self.min_length:
            return None
        model = decoder.model
        stamp = self._stamp(model)
        with self._lock:
            self._entries = [e for e in self._entries if e[0]() is not None]
            mine = [e for e in self._entries if e[0]() is model and e[1] == stamp]
            best = max((e for e in mine if prefix[: len(e[2])] == e[2]), key=lambda e: len(e[2]), default=None)
            have = 0 if best is None else len(best[2])
            shared = max((_common_length(prefix, e[2]) for e in mine if e is not best), default=0)
            if shared > have and shared >= self.min_length:
                target = shared
            elif best is None or (several_rows and len(prefix) - have >= self.min_extend):
                target = len(prefix)
            else:
                target = have
            if target == have:
                self.hits += 1
                self._touch(best)
                return have, best[3]
        # Run the missing part on top of the best cached one (outside the lock: a forward pass).
        key = prefix[:target]
        ids = torch.tensor([key[have:]], device=device)
        mask = torch.ones((1, target), dtype=torch.long, device=device)
        _, past = decoder._forward(ids, mask, None if best is None else best[3])
        if not _batch_first_pairs(past, 1, target):
            return None
        past = tuple(tuple(t for t in layer) for layer in past)
        with self._lock:
            self.runs += 1
            self._entries = [e for e in self._entries if not (e[0]() is model and e[2] == key)]
            self._entries.append((weakref.ref(model), stamp, key, past))
            del self._entries[: max(0, len(self._entries) - self.size)]
        return target, past

    def _touch(self, entry) -> None:
        if entry in self._entries:
            self._entries.remove(entry)
            self._entries.append(entry)


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _batch_first_pairs(past, batch: int, length: int) -> bool:
    """Whether `past` is a legacy cache: per layer a (key, value) of tensors (batch, heads, length, dim)."""
    if not isinstance(past, (tuple, list)) or not past:
        return False
    for layer in past:
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            return False
        for t in layer:
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != batch or t.shape[2] != length:
                return False
    return True


PREFIX_CACHE = PrefixCache()


def _split_head(model):
    """(decoder, output layer) when logits are exactly output_layer(decoder(...)[0]) (Llama, pretraining_tp 1),
    so only the last position of each pass needs the output layer; else None (the full forward is used)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama" or getattr(config, "pretraining_tp", 1) > 1:
        return None
    base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(base, torch.nn.Module) or not isinstance(head, torch.nn.Linear):
        return None
    return base, head


def unconstrained_generate(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    end_token_id: int,
    pad_token_id: int,
    **generate_kwargs,
) -> list[list[int]]:
    """The same greedy generation without constraints, for comparison."""
    return _greedy_generate(model, input_ids, attention_mask, max_new_tokens, end_token_id, pad_token_id,
                            **generate_kwargs)


def _greedy_generate(model, input_ids, attention_mask, max_new_tokens, end_token_id, pad_token_id, **generate_kwargs):
    """HF generate, greedy with the KV cache; the answers without prompt, padding or end token."""
    with torch.no_grad():
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=end_token_id,
            pad_token_id=pad_token_id,
            **generate_kwargs,
        )
    return _answers(sequences, input_ids.shape[1], end_token_id, pad_token_id)
