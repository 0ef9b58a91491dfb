"""Error rendering: carets in terminal cells, long lines as a window, many errors summarised."""

from surgery.errors import MAX_SHOWN_ERRORS, SHOWN_WIDTH, Span, SpecError, SpecErrors
from surgery.models import tiny
from surgery.planner import build_plan
from surgery.syntax import parse


def render(source: str, word: str) -> list[str]:
    i = source.index(word)
    return Span("s.surg", 1, i + 1, 1, i + 1 + len(word), source).render().split("\n")


def test_caret_counts_wide_characters_as_two_cells():
    # Three CJK characters and an emoji before the span: five cells more than characters.
    _, line, caret = render('attn.q: lora(init="日本語😀") + lorra', "lorra")
    assert line == '  attn.q: lora(init="日本語😀") + lorra'
    assert caret == "  " + " " * (len('attn.q: lora(init="日本語😀") + ') + 4) + "^^^^^"
    # A wide span gets two carets per character; a combining accent none.
    assert render('x: "日本"', "日本")[2] == "  " + " " * 4 + "^^^^"
    assert render('x: "e\u0301" + lorra', "lorra")[2] == "  " + " " * len('x: "e" + ') + "^^^^^"
    assert render('x: "\u2764\ufe0f\u200d" + lorra', "lorra")[2] == "  " + " " * len('x: "_" + ') + "^^^^^"


def test_tabs_stay_tabs_under_the_line():
    assert render("attn:\tlora(\tr=0)", "r=0")[2] == "  " + "     \t     \t" + "^^^"


def test_a_long_line_is_shown_as_a_window_around_the_span():
    source = "attn: " + "lora + " * 20000 + "lorra + ia3"
    head, line, caret = render(source, "lorra")
    assert head == f"s.surg:1:{source.index('lorra') + 1}"  # the position is the real one
    assert line.startswith("  …") and line.endswith("lorra + ia3") and len(line) <= SHOWN_WIDTH + 4
    assert line[caret.index("^"):caret.index("^") + 5] == "lorra" and caret.count("^") == 5
    head, line, caret = render(source, "attn")
    assert line.startswith("  attn: lora + ") and line.endswith("…") and caret == "  ^^^^"
    _, line, caret = render(source[:5000] + " lorra " + source[5000:], "lorra")
    assert line.startswith("  …") and line.endswith("…") and line[caret.index("^"):][:5] == "lorra"


def test_many_errors_are_summarised():
    model = tiny("llama")
    text = "".join(f"attn.x{i % 3}: lora\n" for i in range(500))
    try:
        build_plan(parse(text), model)
    except SpecErrors as e:
        rendered = str(e)
        assert len(e.errors) == 500  # all are kept for callers; only the rendering is capped
    assert rendered.count("error: ") == MAX_SHOWN_ERRORS
    assert rendered.endswith(f"… and {500 - MAX_SHOWN_ERRORS} more error(s) (3 distinct message(s))")
    assert str(SpecErrors([SpecError("a"), SpecError("b")])) == "a\n\nb"


def test_a_long_line_of_wide_characters_keeps_the_span_in_its_window():
    source = "attn: lora(init='" + "日" * 100000 + "') + lorra"
    _, line, caret = render(source, "lorra")
    assert line.endswith("日') + lorra") and line.startswith("  …")
    cells = sum(2 if c == "日" else 1 for c in line)
    assert cells <= SHOWN_WIDTH + 3 and caret.endswith("^^^^^") and len(caret) == cells
