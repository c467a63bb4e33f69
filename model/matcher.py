"""One batch row's constrained decoding: which tokens may come next, take one, run the forced ones.

Both decoding paths drive the same object per row, so they apply the same rules (the budget, the
dummy-prefix space, the cheapest spelling of literals) and keep the same confidence record:
- model.decoding.GrammarLogitsProcessor, inside HF generate(): `allowed()` each step, `accept()` the
  token generate() picked;
- model.jump_forward.JumpForwardDecoder, its own loop: `run_forced()` appends every token that has one
  possible value, then `accept()` the token picked among `waiting_on`.
"""

from __future__ import annotations

from collections.abc import Sequence

from model.grammar import Automaton, Constraint, State
from model.vocab import IDS, Vocab, vocab_for


class RowMatcher:
    """The automaton state, answer tokens and confidence record of one row.

    state: None once the row is finished (the end token, out of budget, or no way on).
    tokens: the answer tokens accepted so far (no prompt, no end token).
    choices: (answer index, log-probability under the constraint) of every token picked among several
    allowed ones; a forced token has probability 1 and is not listed (model.confidence).
    """

    def __init__(self, automaton: Automaton, vocab: Vocab, max_new_tokens: int, end_token_id: int):
        self.automaton = automaton
        self.vocab = vocab
        self.max_new_tokens = max_new_tokens
        self.end_token_id = end_token_id
        self.state: State | None = automaton.initial()
        self.tokens: list[int] = []
        self.choices: list[tuple[int, float]] = []
        self._allowed: dict[int, State] = {}  # the last allowed() result, so accept() need not re-walk the trie

    @property
    def done(self) -> bool:
        return self.state is None

    @property
    def waiting_on(self) -> dict[int, State]:
        """The allowed tokens (id -> state after it) computed last: what `run_forced` left the row choosing among."""
        return self._allowed

    def finish(self) -> None:
        self.state = None
        self._allowed = {}

    def allowed(self) -> dict[int, State]:
        """Token id -> state after it, for every token that may come next within the budget; {} when the answer is
        complete or cannot go on (then only the end token may come)."""
        state = self.state
        if state is None or self.automaton.is_final(state):
            self._allowed = {}
            return self._allowed
        remaining = self.max_new_tokens - len(self.tokens)
        # This token and the end token must both still fit after the cheapest way to finish.
        allowed = self._collect(state, remaining - 2)
        if not allowed:
            # max_new_tokens is below even the shortest answer: still make progress towards it.
            allowed = self._collect(state, self.automaton.cost(state) - 1)
        if not self.tokens and self.vocab.lead_bytes:
            # The dummy-prefix space comes as the tokenizer writes it: inside a longer first piece ('▁```')
            # or as the plain '▁' piece (ChatGLM-6B writes '▁', '```', ...), both dropped by decode(); a
            # byte-fallback space ('<0x20>') would decode to a real space, so it may not open an answer.
            allowed = {i: st for i, st in allowed.items() if i not in self.vocab.lead_bytes}
        self._allowed = allowed
        return allowed

    def accept(self, token: int, logprob: float | None = None) -> None:
        """Append `token` (the end token finishes the row); logprob: its probability among several allowed ones."""
        if self.state is None:
            return
        if token == self.end_token_id:
            self.finish()
            return
        if logprob is not None:
            self.choices.append((len(self.tokens), logprob))
        nxt = self._allowed.get(token)
        if nxt is None:  # not picked from allowed() (another logits processor overrode it): spell it out
            nxt = self.automaton.feed(self.state, self.vocab.strings[token] or "\0")
        self.tokens.append(token)
        self.state = nxt
        self._allowed = {}

    def run_forced(self) -> bool:
        """Append every token that has only one possible value; True if the row then needs a choice among
        `waiting_on`, False if it is finished.

        A token is forced when
        - the automaton is inside literal text: the literal's rest is spelled with its cheapest token split
          (`Vocab.split`: exactly the tokens `Automaton.cost` charged to the budget), one option after the
          other. Where a token could run past the literal into what follows ('```json\\n[{"' when the literal
          ends at '[') and the grammar allows one, that boundary is left to the model (`Vocab.spell`), as
          token-by-token decoding would;
        - or exactly one token is allowed (e.g. the budget only lets a span close);
        - or none is: the end token, which finishes the row.
        """
        automaton, vocab = self.automaton, self.vocab
        while True:
            state = self.state
            room = self.max_new_tokens - len(self.tokens)
            if state is None or room <= 0 or automaton.is_final(state):  # the end token, or out of budget
                self.finish()
                return False
            allowed = None
            # The first token follows allowed()'s rule about the dummy-prefix space.
            literal = None if (not self.tokens and vocab.lead) else automaton.literal_rest(state)
            if literal is not None:
                text, after = literal
                tokens, n_chars = vocab.spell(text, automaton.is_final(after))
                if not tokens:
                    # A token running past the literal could start here: a choice if the grammar allows one.
                    allowed = self.allowed()
                    spelled = vocab.split(text)
                    if spelled and allowed and all(len(vocab.strings[t]) <= len(text) for t in allowed):
                        tokens = spelled[:1]
                        n_chars = len(vocab.strings[tokens[0]])
                if tokens:
                    self.tokens += tokens[:room]
                    self._allowed = {}
                    if len(tokens) > room:
                        self.state = None
                    else:
                        self.state = after if n_chars == len(text) else automaton.feed(state, text[:n_chars])
                    continue
            if allowed is None:
                allowed = self.allowed()
            if len(allowed) == 1:
                (token,) = allowed
                self.accept(token)
                continue
            if not allowed:  # no way on: the end token
                self.finish()
                return False
            return True

    def _collect(self, state: State, budget: float) -> dict[int, State]:
        """DFS over the vocabulary trie and the automaton together: token id -> state after it."""
        automaton = self.automaton
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


def row_matchers(
    tokenizer, constraints: Sequence[Constraint], max_new_tokens: int, end_token_id: int
) -> list[RowMatcher]:
    """One matcher per batch row, over the tokenizer's (cached) vocabulary."""
    vocab = vocab_for(tokenizer)
    return [RowMatcher(c.automaton(vocab), vocab, max_new_tokens, end_token_id) for c in constraints]
