"""The answer grammar: per-row character automata that accept exactly the well-formed answers.

A category answer can only be one of the schema's labels in the training format (`["水果"]`);
a triple answer is always the training format ("```json\\n" + a JSON list of
{predicate, object_type, subject_type, object, subject} + "\\n```") with predicates and types
from the schema and subject/object copied verbatim from the input text.

- Each row gets a character-level automaton built from its `Constraint`: a small graph of CHOICE
  nodes (emit one of several strings; a literal is a choice of one) and SPAN nodes (copy a
  non-empty substring of the text, tracking every position where the copied string ends), ending
  in END. The automaton state is an immutable tuple, so it can branch cheaply.
- Budget: `Automaton.cost(state)` is an upper bound on the tokens still needed to finish (before
  the end token) that is reachable one token at a time: each literal piece costs the fewest tokens
  that spell it (model.vocab's DP over the token trie), a span costs one single-character token per
  character. model.decoding allows a token only if `cost(state after it) + 1 <= tokens left after
  it`; since some allowed token always lowers the cost by one, an answer can never run into
  max_new_tokens unfinished.
- The schema part of an automaton (its nodes and their static costs, `Skeleton`) is built once per
  schema and vocabulary; only the text tables are built per row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from core.dataset import JSON_FENCE_CLOSE, JSON_FENCE_OPEN, TRIPLE_KEYS

if TYPE_CHECKING:
    from model.vocab import Vocab

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
    """Characters a span may copy: json.dumps writes them as they are (no backslash escape). Blanks
    (a space, an ideographic space) only inside a span, never first or last: see blank_ok."""
    return ch not in '"\\' and ord(ch) >= 0x20


def blank_ok(text: str, ok: list[bool]) -> list[bool]:
    """Keep a blank copyable only where the run of blanks it is in is followed by a copyable non-blank
    character, so a span that reaches a blank can always go on to a point where it may close
    ("I Do Believe" whole, never "I Do ")."""
    out = list(ok)
    follows = False  # the next non-blank position after i is copyable
    for i in range(len(text) - 1, -1, -1):
        if text[i].isspace():
            out[i] = ok[i] and follows
        else:
            follows = ok[i]
    return out


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
        ok = blank_ok(text, [copyable(ch) and (atomic is None or atomic(ch)) for ch in text])
        # A span starts and closes on a non-blank: starts[i] says a span may begin at i.
        starts = [ok[i] and not ch.isspace() for i, ch in enumerate(text)]
        # past_blanks[e]: length of the run of blanks starting at e (0 if text[e] is no blank).
        self._past_blanks = [0] * (len(text) + 1)
        for i in range(len(text) - 1, -1, -1):
            self._past_blanks[i] = self._past_blanks[i + 1] + 1 if text[i].isspace() else 0
        # run_end[i]: first position >= i that a span cannot copy, so text[e:e+k] is copyable iff e+k <= run_end[e].
        self._run_end = [len(text)] * (len(text) + 1)
        for i in range(len(text) - 1, -1, -1):
            self._run_end[i] = self._run_end[i + 1] if ok[i] else i
        first: dict[str, list[int]] = {}
        for i, ch in enumerate(text):
            if starts[i]:
                first.setdefault(ch, []).append(i + 1)
        self._first = {ch: tuple(ends) for ch, ends in first.items()}
        self._starts = tuple(i for i in range(len(text)) if starts[i])
        self._lstar = self._shortest_free_subject_lengths(starts)
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

    def literal_rest(self, state: State) -> tuple[str, State] | None:
        """(the rest of the literal `state` is inside, the state after it), or None outside a literal.

        One node's option at a time (a choice with one live option), so the tokens spent on it are what
        `cost` charged for that option."""
        node = self.nodes[state.node]
        if node.kind != CHOICE or len(state.alive) != 1:
            return None
        option = node.options[state.alive[0]]
        return option.text[state.off :], self._complete(state, option)

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
        if state.span[-1:].isspace():
            return False
        return node.role != SUBJECT or state.span not in self._forbidden_subjects(state)

    def _to_nonblank(self, state: State) -> int:
        """Characters an open span must still copy before it may close (0 unless it ends in a blank)."""
        if not state.span[-1:].isspace():
            return 0
        return 1 + min(self._past_blanks[end] for end in state.alive)

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
            more = self._to_nonblank(state)
            if more:  # it ends in a blank: a few more characters, then any object (fewer shared fields: a bound)
                return more + self.node_cost[node.next] + self._extra(state.fields, state.emitted)
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
        # Each forbidden string has one length, so among len(forbidden) + 1 lengths at which some candidate
        # ends on a non-blank (a span may only close there) one is free.
        k, lengths_tried = first_k, 0
        while lengths_tried <= len(forbidden):
            any_candidate = closable = False
            for end in ends:
                if end + k <= self._run_end[end]:
                    any_candidate = True
                    candidate = state.span + self.text[end : end + k]
                    if candidate[-1:].isspace():
                        continue
                    closable = True
                    if candidate not in forbidden:
                        return k
            if not any_candidate:
                return INF  # the text ends (or hits an uncopyable character) everywhere
            lengths_tried += closable
            k += 1
        return INF

    def _shortest_free_subject_lengths(self, starts: list[bool]) -> list[float]:
        """lstar[F]: smallest L with more than F distinct copyable substrings of length <= L."""
        lstar: list[float] = []
        distinct = 0
        length = 0
        for n_forbidden in range(self.max_triples + 1):
            while distinct <= n_forbidden and length < self.max_triples + 1:
                length += 1
                distinct += len({self.text[i : i + length] for i in self._starts_of_length(starts, length)})
            lstar.append(length if distinct > n_forbidden else INF)
        return lstar

    def _starts_of_length(self, starts: list[bool], length: int) -> list[int]:
        """Starts of spans of this length that may close at their end (their last character is no blank)."""
        return [
            i for i in range(len(self.text) - length + 1)
            if starts[i] and i + length <= self._run_end[i] and not self.text[i + length - 1].isspace()
        ]


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
            raise ValueError("schema has no 'predicates': was it written by core.dataset.derive_schema?")
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


