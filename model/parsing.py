"""Model answer text -> a known label or a list of Triples, with warnings instead of exceptions (pure).

Unconstrained models emit almost-JSON: missing fences, chatter around the answer, single quotes,
lists cut off at max_new_tokens. The parsers repair what they can, say what they repaired in
`warnings`, validate against the schema and the input text, and never raise on any string.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field

# The training answer's format, defined once with the dataset format (core.dataset is pure: no torch).
from core.dataset import JSON_FENCE_CLOSE, JSON_FENCE_OPEN, TRIPLE_KEYS

# Long enough for any real answer; beyond it only the start is shown in a warning.
_SHOWN_CHARS = 60
# About twenty times the longest training answer (1066 chars); real answers are bounded by max_new_tokens anyway.
_LITERAL_EVAL_MAX_CHARS = 20_000


@dataclass(frozen=True)
class Triple:
    """One (subject, predicate, object) fact with the entity types, as in the training answers."""

    subject: str
    predicate: str
    object: str
    subject_type: str = ""
    object_type: str = ""
    # From the model's token probabilities under the constraint (model.confidence); None for a parsed or
    # gold triple. Not part of the fact: equality and the training format ignore it.
    confidence: float | None = field(default=None, compare=False)

    def key(self) -> tuple[str, str, str]:
        """What evaluation matches on: types are descriptive, not part of the fact."""
        return (self.subject, self.predicate, self.object)

    def to_dict(self) -> dict[str, str]:
        """The training answer's object, keys in the training order."""
        return {key: getattr(self, key) for key in TRIPLE_KEYS}

    def to_output(self) -> dict:
        """What the labeller writes: the training object plus its confidence (rounded to 3 decimals)."""
        data: dict = self.to_dict()
        if self.confidence is not None:
            data["confidence"] = round(self.confidence, 3)
        return data


@dataclass(frozen=True)
class ParsedCategory:
    """A known label (None if none could be recovered) and what was repaired or rejected."""

    label: str | None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ParsedTriples:
    """Valid triples, what was repaired or dropped, and whether the answer was strictly well-formed."""

    triples: list[Triple]
    warnings: list[str] = field(default_factory=list)
    ok: bool = False


def _shown(value: object) -> str:
    """A value for a warning message, shortened so a runaway answer cannot flood the log."""
    # Strings are quoted so that empty or blank ones stay visible; other values are shown as repr.
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


# --------------------------------------------------------------------------- formatting


def format_category(label: str) -> str:
    """The training answer for a label, e.g. '["水果"]'."""
    return json.dumps([label], ensure_ascii=False)


def format_triples(triples: list[Triple]) -> str:
    """The training answer for triples: ```json fence, one-line JSON list, closing fence."""
    return JSON_FENCE_OPEN + json.dumps([t.to_dict() for t in triples], ensure_ascii=False) + JSON_FENCE_CLOSE


# --------------------------------------------------------------------------- lenient JSON


def _loads_lenient(text: str) -> tuple[object, str | None]:
    """Parse JSON, else a Python literal (single quotes), else JSON with ' swapped for ".

    Returns (value, repair warning or None); raises ValueError if nothing parses.
    """
    try:
        return json.loads(text), None
    except Exception:  # RecursionError on deep nesting must not escape either
        pass
    # literal_eval builds only literals (no code runs) and copes with quotes inside strings, but the
    # AST compiler can overflow the C stack on huge inputs: only short answers with ' get it.
    if "'" in text and len(text) <= _LITERAL_EVAL_MAX_CHARS:
        try:
            return ast.literal_eval(text), "repaired: single quotes instead of JSON double quotes"
        except Exception:  # SyntaxError, ValueError, MemoryError, RecursionError...
            pass
    try:
        return json.loads(text.replace("'", '"')), "repaired: single quotes instead of JSON double quotes"
    except Exception:
        raise ValueError("not JSON") from None


def _scan(text: str, start: int) -> tuple[int | None, list[tuple[int, int]]]:
    """Walk a bracketed value from text[start] ('[' or '{'), skipping quoted strings.

    Returns (index of the matching close bracket or None if the text ends first,
    spans of the complete {...} objects directly inside it, or the value itself if it is an object).
    """
    depth = 0
    quote = ""
    escaped = False
    object_depth = 1 if text[start] == "[" else 0
    objects: list[tuple[int, int]] = []
    object_start = -1
    for i in range(start, len(text)):
        char = text[i]
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
            continue
        if char in "\"'":
            quote = char
        elif char in "[{":
            if char == "{" and depth == object_depth:
                object_start = i
            depth += 1
        elif char in "]}":
            depth -= 1
            if char == "}" and depth == object_depth and object_start >= 0:
                objects.append((object_start, i + 1))
                object_start = -1
            if depth == 0:
                return i, objects
    return None, objects


# --------------------------------------------------------------------------- categories


_QUOTED_RE = re.compile(r"\"([^\"]*)\"|'([^']*)'|“([^”]*)”|‘([^’]*)’")


def _category_candidates(answer: str) -> tuple[list[str], list[str]]:
    """The label strings the answer seems to give, and the repairs needed to read them."""
    try:
        value = json.loads(answer)
    except Exception:
        value = None
    if value == []:
        return [], []
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return value, []
    if isinstance(value, str):
        return [value], ["repaired: a JSON string instead of a JSON list"]
    warnings: list[str] = []
    start = answer.find("[")
    if start < 0:
        return [answer.strip().strip("\"'“”‘’").strip()], ["repaired: bare label without a JSON list"]
    if answer[:start].strip():
        warnings.append(f"repaired: ignored text before the list: {_shown(answer[:start].strip())}")
    end, _ = _scan(answer, start)
    if end is None:
        warnings.append("repaired: missing closing bracket")
        body = answer[start + 1 :]
    else:
        if answer[end + 1 :].strip():
            warnings.append(f"repaired: ignored text after the list: {_shown(answer[end + 1 :].strip())}")
        body = answer[start + 1 : end]
    quoted = [next(g for g in match.groups() if g is not None) for match in _QUOTED_RE.finditer(body)]
    if quoted:
        if not body.lstrip().startswith('"'):
            warnings.append("repaired: label quoted with other than JSON double quotes")
        return quoted, warnings
    bare = [part.strip() for part in body.split(",") if part.strip()]
    warnings.append("repaired: unquoted label in the list")
    return bare, warnings


def _labels_in(answer: str, labels: list[str]) -> list[str]:
    """Known labels occurring in the answer, minus those only seen inside a longer matched label."""
    found = [label for label in labels if label and label in answer]
    return [label for label in found if not any(label != other and label in other for other in found)]


def parse_category(answer: str, labels: list[str]) -> ParsedCategory:
    """The known label an answer names, or None with a warning saying why. Never raises."""
    if not isinstance(answer, str):
        return ParsedCategory(None, [f"answer is not a string but {type(answer).__name__}"])
    if not answer.strip():
        return ParsedCategory(None, ["empty answer"])
    known = [label for label in labels if isinstance(label, str)]
    candidates, warnings = _category_candidates(answer.strip())
    stripped = [c.strip() for c in candidates if isinstance(c, str) and c.strip()]
    if stripped != list(candidates):
        warnings.append("repaired: whitespace or empty items around the label")
    matches = [c for c in stripped if c in known]
    if matches:
        if len(stripped) > 1:
            warnings.append(f"answer gives {len(stripped)} labels {_shown(stripped)}; took the first known one")
        return ParsedCategory(matches[0], warnings)
    # The model named no known label as such: accept one if it is unambiguous inside the answer.
    inside = _labels_in(answer, known)
    named = f"label {_shown(stripped[0])} is not a known label" if stripped else "no label in the answer"
    if len(inside) == 1:
        warnings.append(f"{named}; took known label {inside[0]!r} found in the answer")
        return ParsedCategory(inside[0], warnings)
    if inside:
        warnings.append(f"{named}; the answer mentions several known labels {inside}")
    else:
        warnings.append(named)
    return ParsedCategory(None, warnings)


# --------------------------------------------------------------------------- triples


def _unfence(answer: str) -> tuple[str, list[str]]:
    """The text inside the ```json fence, and the repairs needed to find it."""
    warnings: list[str] = []
    opening = answer.find("```")
    if opening < 0:
        return answer, ["repaired: missing ```json fence"]
    if answer[:opening].strip():
        warnings.append(f"repaired: ignored text before the ```json fence: {_shown(answer[:opening].strip())}")
    body_start = opening + 3
    if answer.startswith("json", body_start):
        body_start += len("json")
    else:
        warnings.append("repaired: fence opened with ``` instead of ```json")
    closing = answer.find("```", body_start)
    if closing < 0:
        warnings.append("repaired: missing closing ``` fence")
        return answer[body_start:], warnings
    if answer[closing + 3 :].strip():
        warnings.append(f"repaired: ignored text after the closing fence: {_shown(answer[closing + 3 :].strip())}")
    return answer[body_start:closing], warnings


def _json_items(body: str) -> tuple[list[object], list[str]]:
    """The items of the JSON list in `body`, keeping the complete objects of a truncated one."""
    body = body.strip()
    try:
        value, repair = _loads_lenient(body)
        return _as_items(value, [repair] if repair else [])
    except ValueError:
        pass
    starts = [i for i in (body.find("["), body.find("{")) if i >= 0]
    if not starts:
        return [], [f"no JSON list in the answer: {_shown(body)}"]
    start = min(starts)
    end, spans = _scan(body, start)
    warnings: list[str] = []
    if body[:start].strip():
        warnings.append(f"repaired: ignored text before the JSON: {_shown(body[:start].strip())}")
    if end is not None:
        if body[end + 1 :].strip():
            warnings.append(f"repaired: ignored text after the JSON: {_shown(body[end + 1 :].strip())}")
        try:
            value, repair = _loads_lenient(body[start : end + 1])
            return _as_items(value, warnings + ([repair] if repair else []))
        except ValueError:
            pass
    else:
        warnings.append(f"repaired: truncated JSON, kept the {len(spans)} complete object(s)")
    # Broken or cut off as a whole: salvage every complete object inside it.
    items: list[object] = []
    for first, last in spans:
        try:
            value, repair = _loads_lenient(body[first:last])
        except ValueError:
            warnings.append(f"dropped an object that is not valid JSON: {_shown(body[first:last])}")
            continue
        items.append(value)
        if repair and repair not in warnings:
            warnings.append(repair)
    if end is not None:
        warnings.append(f"repaired: invalid JSON list, kept the {len(items)} object(s) that parse")
    return items, warnings


def _as_items(value: object, warnings: list[str]) -> tuple[list[object], list[str]]:
    """A parsed value as a list of items: a list as is, a lone triple object wrapped, anything else empty."""
    if isinstance(value, list):
        return value, warnings
    if isinstance(value, dict) and any(key in value for key in TRIPLE_KEYS):
        return [value], warnings + ["repaired: a single object instead of a list"]
    return [], warnings + [f"answer is JSON but not a list of triples: {_shown(value)}"]


def _to_triple(item: object) -> tuple[Triple | None, list[str]]:
    """A Triple from one parsed item, or None with the reason it was dropped."""
    if not isinstance(item, dict):
        return None, [f"dropped an item that is not an object: {_shown(item)}"]
    values: dict[str, str] = {}
    warnings: list[str] = []
    bad = []
    for key in TRIPLE_KEYS:
        value = item.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # A number for e.g. 人口数量 is still the fact; the training answers hold it as a string.
            warnings.append(f"repaired: {key} {value!r} was a number, not a string")
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            bad.append(key)
            continue
        if value != value.strip():
            warnings.append(f"repaired: whitespace around {key} {_shown(value)}")
        values[key] = value.strip()
    if bad:
        return None, [f"dropped an object missing non-empty string key(s) {bad}: {_shown(item)}"]
    extra = sorted(str(key) for key in item if key not in TRIPLE_KEYS)
    if extra:
        warnings.append(f"repaired: ignored unknown key(s) {extra}")
    return Triple(**values), warnings


def _schema_check(triple: Triple, predicates: dict) -> tuple[bool, list[str]]:
    """(keep?, warnings): an unknown predicate is dropped, unexpected types only reported."""
    entry = predicates.get(triple.predicate)
    if not isinstance(entry, dict):
        return False, [f"dropped {triple.key()}: predicate {triple.predicate!r} is not in the schema"]
    warnings = []
    for key in ("subject_type", "object_type"):
        expected = entry.get(key) or []
        if getattr(triple, key) not in expected:
            warnings.append(
                f"{triple.key()}: {key} {getattr(triple, key)!r} is not one the schema gives for "
                f"{triple.predicate!r} ({expected})"
            )
    return True, warnings


def _text_check(triple: Triple, text: str) -> tuple[bool, list[str]]:
    """(keep?, warnings): subject and object must be copied from the text."""
    warnings = []
    for key in ("subject", "object"):
        value = getattr(triple, key)
        if value in text:
            continue
        # The training data itself lower-cases some names (java程序设计教程 for 《Java程序设计教程》).
        if value.casefold() in text.casefold():
            warnings.append(f"{triple.key()}: {key} {value!r} is in the text only ignoring case")
            continue
        return False, [f"dropped {triple.key()}: {key} {value!r} is not in the text"]
    return True, warnings


def parse_triples(answer: str, schema: dict | None = None, text: str | None = None) -> ParsedTriples:
    """The triples an answer gives, validated against the schema and the text when given. Never raises.

    `ok` is about form only: the answer needed no repair, i.e. it is a ```json fence, a JSON list of
    objects with exactly the five non-empty string keys, and a closing fence, with nothing around it
    but whitespace (JSON whitespace inside is free). Dropping a duplicate or a triple the schema or
    the text rejects does not clear `ok`.
    """
    if not isinstance(answer, str):
        return ParsedTriples([], [f"answer is not a string but {type(answer).__name__}"], False)
    if not answer.strip():
        return ParsedTriples([], ["empty answer"], False)
    body, repairs = _unfence(answer.strip())
    items, more = _json_items(body)
    repairs += more
    triples: list[Triple] = []
    for item in items:
        triple, item_warnings = _to_triple(item)
        repairs += item_warnings
        if triple is not None:
            triples.append(triple)
    ok = not repairs
    warnings = list(repairs)
    triples, checks = _validate(triples, schema, text)
    return ParsedTriples(triples, warnings + checks, ok)


def _validate(triples: list[Triple], schema: dict | None, text: str | None) -> tuple[list[Triple], list[str]]:
    """Drop duplicates, predicates outside the schema and spans not in the text, with a warning each."""
    predicates = schema.get("predicates") if isinstance(schema, dict) else None
    if isinstance(schema, dict) and not isinstance(predicates, dict):
        predicates = {}  # a schema trained on no extraction rows knows no predicate
    kept: list[Triple] = []
    seen: set[tuple[str, str, str]] = set()
    warnings: list[str] = []
    for triple in triples:
        if triple.key() in seen:
            warnings.append(f"dropped duplicate {triple.key()}")
            continue
        seen.add(triple.key())
        keep, notes = True, []
        if predicates is not None:
            keep, notes = _schema_check(triple, predicates)
        if keep and isinstance(text, str):
            keep, more = _text_check(triple, text)
            notes += more
        warnings += notes
        if keep:
            kept.append(triple)
    return kept, warnings
