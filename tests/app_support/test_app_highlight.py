"""app_support.highlight: spans marked, everything else escaped."""

from __future__ import annotations

from app_support.highlight import highlight_html, span_roles
from model.parsing import Triple


def triple(subject: str, obj: str) -> Triple:
    return Triple(subject, "作者", obj, "图书作品", "人物")


def test_no_triples_is_escaped_text():
    assert highlight_html("a<b>&\"c", []) == "a&lt;b&gt;&amp;&quot;c"


def test_subject_and_object_marked():
    out = highlight_html("《平凡的世界》是路遥写的", [triple("平凡的世界", "路遥")])
    assert out.count("<mark") == 2
    assert 'title="subject 主体">平凡的世界</mark>' in out
    assert 'title="object 客体">路遥</mark>' in out
    assert out.startswith("《<mark") and out.endswith("写的")


def test_model_output_cannot_inject_html():
    text = "<script>alert(1)</script> 的作者"
    out = highlight_html(text, [triple("<script>alert(1)</script>", "作者")])
    assert "<script>" not in out
    assert "&lt;script&gt;" in out


def test_overlap_is_both_and_every_occurrence_marked():
    roles = span_roles("ab ab", [triple("ab", "b")])
    assert roles == ["subject", "both", None, "subject", "both"]


def test_case_insensitive_span_and_newlines():
    out = highlight_html("Java\n教程", [triple("java", "教程")])
    assert "Java</mark>" in out
    assert "<br>" in out


def test_blank_spans_are_ignored():
    assert highlight_html("abc", [Triple(" ", "p", "", "", "")]) == "abc"
