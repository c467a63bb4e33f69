"""The input text as HTML with extracted subjects and objects in <mark> (no streamlit here).

Everything from the text or the model is HTML-escaped: a comment is user input and the page
renders this with unsafe_allow_html, so only the <mark> tags built here may reach the browser.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

# Inline styles: Streamlit's markdown keeps style attributes but drops <style> blocks.
STYLES = {
    "subject": "background:#ffe08a;padding:0 2px;border-radius:3px",
    "object": "background:#a8e6cf;padding:0 2px;border-radius:3px",
    "both": "background:#ffb3a7;padding:0 2px;border-radius:3px",
}
TITLES = {"subject": "subject 主体", "object": "object 客体", "both": "subject + object"}


def span_roles(text: str, triples: Iterable) -> list[str | None]:
    """For each character of text: 'subject', 'object', 'both' or None.

    Every occurrence of a span is marked (the model names a span, not a position). Spans that
    parsing accepted only ignoring case are found ignoring case too.
    """
    roles: list[str | None] = [None] * len(text)
    for triple in triples:
        for role in ("subject", "object"):
            span = getattr(triple, role, "") or ""
            if not span.strip():
                continue
            for match in re.finditer(re.escape(span), text, flags=re.IGNORECASE):
                for i in range(match.start(), match.end()):
                    roles[i] = role if roles[i] in (None, role) else "both"
    return roles


def highlight_html(text: str, triples: Iterable) -> str:
    """Escaped text with subject/object spans wrapped in styled <mark> tags; newlines as <br>."""
    roles = span_roles(text, triples)
    parts: list[str] = []
    start = 0
    for i in range(1, len(text) + 1):
        if i == len(text) or roles[i] != roles[start]:
            chunk = html.escape(text[start:i]).replace("\n", "<br>")
            role = roles[start]
            if role is None:
                parts.append(chunk)
            else:
                parts.append(f'<mark style="{STYLES[role]}" title="{TITLES[role]}">{chunk}</mark>')
            start = i
    return "".join(parts)


def legend_html() -> str:
    return " ".join(
        f'<mark style="{STYLES[role]}">{html.escape(TITLES[role])}</mark>' for role in ("subject", "object", "both")
    )
