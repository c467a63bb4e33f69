"""Our training answer format as a grammar for the constrained-decoding libraries: xgrammar's EBNF (what vLLM's
structured outputs run) and llguidance's Lark.

Per text, as ours is: a category is one of the schema's labels; a triples answer is the training format with
each predicate's own subject/object types and spans that are substrings of the text (xgrammar's Substring rule,
llguidance's substring_chars). What the libraries cannot say and our decoder (model.grammar) does: the token
budget (their answers can run into it and then do not parse), no repeated triple, and no empty span.
Used by bench.grammar_engines (ours against both libraries) and model.vllm_engine (--engine ray-vllm).
"""

from __future__ import annotations

import json

XGRAMMAR, LLGUIDANCE = "xgrammar", "llguidance"


def _lit(text: str) -> str:
    """A string literal both grammar languages read (JSON escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _json_chars(text: str) -> list[str]:
    """The text's characters as they appear inside a JSON string of the answer (escaped where JSON escapes)."""
    return [_escaped(ch) for ch in text]


def _escaped(text: str) -> str:
    """The text as it stands inside a JSON string of the answer (json.dumps, ensure_ascii=False)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def _triple_alternatives(schema: dict, span: str) -> list[str]:
    """One grammar sequence per predicate: the training format's keys in order, the predicate's own types."""
    alternatives = []
    for name, entry in schema["predicates"].items():
        object_types = " | ".join(_lit(_escaped(t)) for t in entry["object_type"])
        subject_types = " | ".join(_lit(_escaped(t)) for t in entry["subject_type"])
        head = '{"predicate": "' + _escaped(name) + '", "object_type": "'
        alternatives.append(" ".join([
            _lit(head), f"({object_types})", _lit('", "subject_type": "'), f"({subject_types})",
            _lit('", "object": "'), span, _lit('", "subject": "'), span, _lit('"}'),
        ]))
    return alternatives


# What differs between xgrammar's EBNF and llguidance's Lark for the same grammar: the start rule's name,
# the rule sign, and how a span (a substring of the text's characters) is written.
DIALECTS = {
    XGRAMMAR: {"start": "root", "is": " ::=", "span": "span",
               "span_rule": lambda chars: "span ::= Substring(" + (", ".join(_lit(c) for c in chars) or '""') + ")"},
    LLGUIDANCE: {"start": "start", "is": ":", "span": "SPAN",
                 "span_rule": lambda chars: "SPAN: %regex " + json.dumps({"substring_chars": "".join(chars)},
                                                                         ensure_ascii=False)},
}


def library_grammar(engine: str, schema: dict, task: str, text: str) -> str:
    """Our training answer for one text as the library's grammar: the label set, or the triple format."""
    from core.dataset import CLASSIFICATION, JSON_FENCE_CLOSE, JSON_FENCE_OPEN

    d = DIALECTS[engine]
    if task == CLASSIFICATION:
        labels = " | ".join(_lit(_escaped(label)) for label in schema["labels"])
        return f'{d["start"]}{d["is"]} "[\\"" ({labels}) "\\"]"'
    triples = " | ".join(f"({alt})" for alt in _triple_alternatives(schema, d["span"]))
    return "\n".join([
        f'{d["start"]}{d["is"]} {_lit(JSON_FENCE_OPEN + "[")} (triple more)? {_lit("]" + JSON_FENCE_CLOSE)}',
        f'more{d["is"]} ({_lit(", ")} triple more)?',
        f'triple{d["is"]} {triples}',
        d["span_rule"](_json_chars(text)),
    ])


# ---------------------------------------------------------------- the check: python -m model.library_grammar

CHECK_HELP = """Does the installed xgrammar accept every reference answer under its text's grammar (what vLLM runs for
--engine ray-vllm)? Needs xgrammar (requirements-vllm.txt pins it through vLLM); no model, no GPU. Answers our
decoder cannot hold by design (model.grammar_check.unholdable) are counted apart. A span not in its text must be
refused: one tampered answer per file checks that."""


def check_main(argv: list[str] | None = None) -> dict:
    import argparse

    import xgrammar.testing  # the library's own string-acceptance helper (private API: a check, not serving)

    from core.dataset import EXTRACTION, derive_schema, read_jsonl
    from model.grammar_check import unholdable

    parser = argparse.ArgumentParser(description=CHECK_HELP)
    parser.add_argument("--data", default="data/mixed_train_dataset.jsonl,data/mixed_dev_dataset.jsonl")
    parser.add_argument("--schema", default=None, help="a model's schema.json (default: derived from the data)")
    args = parser.parse_args(argv)
    examples = [e for path in args.data.split(",") for e in read_jsonl(path)]
    schema = json.loads(open(args.schema, encoding="utf-8").read()) if args.schema else derive_schema(examples)
    counts: dict[str, int] = {"accepted": 0, "refused": 0, "unholdable_refused": 0, "unholdable_accepted": 0}
    refused = []
    for example in examples:
        grammar = library_grammar(XGRAMMAR, schema, example.task, example.text)
        ok = xgrammar.testing._is_grammar_accept_string(grammar, example.target)
        kind = "unholdable_" if unholdable(example) else ""
        counts[kind + ("accepted" if ok else "refused")] += 1
        if not ok and not kind:
            refused.append(example.target[:100])
    spanned = next(e for e in examples if e.task == EXTRACTION and '"subject": "' in e.target and not unholdable(e))
    tampered = spanned.target.replace('"subject": "', '"subject": "不在原文', 1)
    counts["tampered_span_accepted"] = int(xgrammar.testing._is_grammar_accept_string(
        library_grammar(XGRAMMAR, schema, EXTRACTION, spanned.text), tampered))
    print(json.dumps(counts), *refused[:5], sep="\n")
    if refused or counts["tampered_span_accepted"]:
        raise SystemExit("the grammar refuses reference answers or accepts a span that is not in its text")
    return counts


if __name__ == "__main__":
    check_main()
