"""Text from outside (alert labels, role names, query text) is inert in an artifact.

Rendered by a CommonMark parser (markdown-it-py, which Prefect installs through rich), the
escaped text is one paragraph of plain text that reads exactly as the original: no link,
image, HTML, emphasis, code span, heading, list, quote or rule, whatever the label says.
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from flows.common import md_code, md_escape, table

MD = MarkdownIt("commonmark")
#: Characters markdown gives meaning to, so generated text hits them often.
MARKUP = st.sampled_from([*"\\`*_{}[]()<>#+-!|~&=.:;/\"' \t\n0123456789", "http://x"])
#: NUL is left out: CommonMark renders it as U+FFFD by design, which is inert too.
ANY = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=3)
OUTSIDE_TEXT = st.lists(st.one_of(MARKUP, ANY), max_size=30).map("".join)


def rendered(markdown: str) -> tuple[list[str], str]:
    """Block token types, and the plain text of the one paragraph (if it is one)."""
    tokens = MD.parse(markdown)
    kinds = [t.type for t in tokens]
    inline = [t for t in tokens if t.type == "inline"]
    children = [c for t in inline for c in (t.children or [])]
    kinds += sorted({c.type for c in children} - {"text"})
    return kinds, "".join(c.content for c in children if c.type == "text")


@given(OUTSIDE_TEXT)
@example("- item")
@example("1. first")
@example("2) second")
@example("---")
@example("&lt;b&gt; &amp; &#42;")
@example("[click](http://evil.example) ![i](x) <b>x</b> *em* `code` # h > q | t")
def test_escaped_text_renders_as_the_same_plain_text(value: str) -> None:
    plain = " ".join(value.split())
    kinds, text = rendered(md_escape(value))
    if not plain:
        assert kinds == []
        return
    assert kinds == ["paragraph_open", "inline", "paragraph_close"]
    assert text == plain


@given(OUTSIDE_TEXT.filter(str.strip))
def test_escaped_text_in_a_sentence_stays_in_the_sentence(value: str) -> None:
    kinds, text = rendered(f"Requested by **{md_escape(value)}** for this run.")
    assert kinds == ["paragraph_open", "inline", "paragraph_close", "strong_close", "strong_open"]
    assert text == f"Requested by {' '.join(value.split())} for this run."


@given(OUTSIDE_TEXT.filter(str.strip))
def test_code_spans_show_the_text_verbatim(value: str) -> None:
    plain = " ".join(value.split())
    tokens = MD.parse(md_code(value))
    (inline,) = [t for t in tokens if t.type == "inline"]
    (span,) = inline.children or []
    assert span.type == "code_inline"
    # CommonMark strips one space each side of a span that is padded on both.
    assert span.content in {plain, plain[1:-1] if plain.startswith(" ") else plain}


@given(st.lists(st.tuples(OUTSIDE_TEXT, OUTSIDE_TEXT), min_size=1, max_size=4))
def test_a_table_keeps_its_shape_whatever_the_cells_say(rows: list[tuple[str, str]]) -> None:
    md = table(["label", "value"], rows)
    # Without the GFM table extension, the table is one paragraph of text: no cell
    # content opens a block of its own (a list, a heading, a quote) or a link.
    assert md.count("\n") == len(rows) + 1
    kinds, _ = rendered(md)
    assert set(kinds) <= {"paragraph_open", "inline", "paragraph_close", "softbreak"}
