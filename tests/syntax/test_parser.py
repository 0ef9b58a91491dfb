"""The `.surg` parser: the AST it builds, the spans it records, and the errors it renders."""

import re
from pathlib import Path

import pytest

from surgery.errors import SpecError
from surgery.syntax import ast, parse, parse_file
from surgery.syntax.parser import MAX_NESTING, MAX_NODES

DESIGN_CARD = "attn.*: rope(ntk_dynamic, scale=4) + window(4096, sinks=4); mlp.down: lora(r=16) | ia3"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "language.md"


def shape(node):
    """The AST without spans, as nested tuples (a value's type is kept: True is not 1)."""
    if isinstance(node, ast.Spec):
        return tuple(shape(r) for r in node.rules)
    if isinstance(node, ast.Rule):
        return (tuple(shape(s) for s in node.selectors), shape(node.expr))
    if isinstance(node, ast.RoleSelector):
        return ("role", tuple((s.name, None if s.index is None else (s.index.start, s.index.stop, s.index.is_slice))
                              for s in node.segments))
    if isinstance(node, ast.RawSelector):
        return ("raw", node.pattern)
    if isinstance(node, ast.Call):
        return ("call", node.name, node.has_parens, tuple((a.key, shape(a.value)) for a in node.args))
    if isinstance(node, ast.Seq):
        return ("seq", tuple(shape(i) for i in node.items))
    if isinstance(node, ast.Par):
        return ("par", tuple(shape(i) for i in node.items))
    if isinstance(node, ast.ListValue):
        return ("list", tuple(shape(i) for i in node.items))
    if isinstance(node, ast.Literal):
        return ("lit", type(node.value).__name__, node.value)
    raise TypeError(node)


def word(name):
    return ("call", name, False, ())


def call(name, *args):
    return ("call", name, True, tuple(args))


def lit(value):
    return ("lit", type(value).__name__, value)


def role(*segments):
    return ("role", tuple(segments))


def text_at(source: str, span) -> str:
    """The source text a span covers (1-based, end exclusive)."""
    lines = source.split("\n")
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line) + 1)
    start = offsets[span.line - 1] + span.column - 1
    end = offsets[span.end_line - 1] + span.end_column - 1
    return source[start:end]


def error(text: str, file: str = "<spec>") -> str:
    with pytest.raises(SpecError) as info:
        parse(text, file)
    return str(info.value)


# ------------------------------------------------------------------------------------ structure


def test_design_card_parses_verbatim():
    spec = parse(DESIGN_CARD)
    assert shape(spec) == (
        (
            (role(("attn", None), ("*", None)),),
            ("seq", (
                call("rope", (None, word("ntk_dynamic")), ("scale", lit(4))),
                call("window", (None, lit(4096)), ("sinks", lit(4))),
            )),
        ),
        (
            (role(("mlp", None), ("down", None)),),
            ("par", (call("lora", ("r", lit(16))), word("ia3"))),
        ),
    )
    first, second = spec.rules
    assert isinstance(first.expr, ast.Seq) and isinstance(second.expr, ast.Par)
    ia3 = second.expr.items[1]
    assert isinstance(ia3, ast.Call) and ia3.args == () and not ia3.has_parens
    assert spec.source == DESIGN_CARD and spec.file == "<spec>"


def test_rules_separated_by_semicolons_newlines_and_comments():
    by_semicolon = parse("attn.q: lora(r=4); mlp.down: ia3;")
    by_newline = parse("# adapters\n\nattn.q: lora(r=4)   # the query\n\n  mlp.down: ia3\n# end\n")
    assert shape(by_semicolon) == shape(by_newline) == (
        ((role(("attn", None), ("q", None)),), call("lora", ("r", lit(4)))),
        ((role(("mlp", None), ("down", None)),), word("ia3")),
    )
    # A '#' inside a string is text, not a comment; ';;' and CRLF line ends are fine.
    spec = parse('"a#b": lora(init="x#y");;\r\nmlp: ia3\r\n')
    assert shape(spec)[0] == ((("raw", "a#b"),), call("lora", ("init", lit("x#y"))))
    assert len(spec.rules) == 2


def test_a_rule_may_span_lines():
    spec = parse("attn.q:\n  lora(r=4,\n       alpha=8)\n  | ia3\nmlp: ia3")
    assert shape(spec.rules[0].expr) == ("par", (call("lora", ("r", lit(4)), ("alpha", lit(8))), word("ia3")))
    assert len(spec.rules) == 2


def test_empty_and_comment_only_specs_have_no_rules():
    assert parse("").rules == ()
    assert parse("# nothing\n;\n").rules == ()


def test_several_selectors_share_one_expression():
    spec = parse('attn.q, mlp.down, "lm_head": lora(r=2)')
    assert shape(spec.rules[0])[0] == (
        role(("attn", None), ("q", None)), role(("mlp", None), ("down", None)), ("raw", "lm_head"))


@pytest.mark.parametrize("text, expected", [
    ("embed", (("embed", None),)),
    ("layers[0:8]", (("layers", (0, 8, True)),)),
    ("layers[3].attn", (("layers", (3, None, False)), ("attn", None))),
    ("layers[-4:]", (("layers", (-4, None, True)),)),
    ("layers[:2].mlp.down", (("layers", (None, 2, True)), ("mlp", None), ("down", None))),
    ("layers[:]", (("layers", (None, None, True)),)),
    ("layers[-1]", (("layers", (-1, None, False)),)),
    ("attn", (("attn", None),)),
    ("attn.q", (("attn", None), ("q", None))),
    ("mlp.down", (("mlp", None), ("down", None))),
    ("lm_head", (("lm_head", None),)),
    ("*", (("*", None),)),
    ("attn.*", (("attn", None), ("*", None))),
    ("*.q", (("*", None), ("q", None))),
])
def test_role_selectors(text, expected):
    (selector,) = parse(f"{text}: lora").rules[0].selectors
    assert shape(selector) == ("role", expected)
    assert str(selector) == text


@pytest.mark.parametrize("text, pattern", [
    ('"model.layers.*.self_attn.q_proj"', "model.layers.*.self_attn.q_proj"),
    ("'model.layers.[0-3].mlp.*'", "model.layers.[0-3].mlp.*"),
    ('"lm_head"', "lm_head"),
])
def test_quoted_raw_selectors_keep_their_glob(text, pattern):
    (selector,) = parse(f"{text}: lora").rules[0].selectors
    assert isinstance(selector, ast.RawSelector) and selector.pattern == pattern


def test_operators_and_parentheses():
    a, b, c, d = (word(n) for n in "abcd")
    cases = {
        "a + b + c": ("seq", (a, b, c)),
        "a | b | c": ("par", (a, b, c)),
        "(a | b) + c": ("seq", (("par", (a, b)), c)),
        "a + (b | c)": ("seq", (a, ("par", (b, c)))),
        "(a + b) | (c + d)": ("par", (("seq", (a, b)), ("seq", (c, d)))),
        "((a))": a,
        "(a + (b | (c + d)))": ("seq", (a, ("par", (b, ("seq", (c, d)))))),
        "a()": ("call", "a", True, ()),
    }
    for text, expected in cases.items():
        assert shape(parse(f"mlp: {text}").rules[0].expr) == expected, text


@pytest.mark.parametrize("text", ["a + b | c", "a | b + c", "(a + b | c) + d", "f(x=a | b + c)"])
def test_mixing_plus_and_bar_needs_parentheses(text):
    message = error(f"mlp: {text}")
    assert "'+' and '|' are mixed here; add parentheses to say which applies first" in message


def test_gate_and_fuse_take_expressions():
    gate = parse("attn: gate(lora | ia3)").rules[0].expr
    assert shape(gate) == call("gate", (None, ("par", (word("lora"), word("ia3")))))
    fuse = parse("mlp: fuse(a, b, c)").rules[0].expr
    assert shape(fuse) == call("fuse", (None, word("a")), (None, word("b")), (None, word("c")))
    nested = parse("mlp: gate(lora(r=4) + ia3, fuse(x, y))").rules[0].expr
    assert shape(nested) == call(
        "gate",
        (None, ("seq", (call("lora", ("r", lit(4))), word("ia3")))),
        (None, call("fuse", (None, word("x")), (None, word("y")))),
    )


def test_argument_values():
    expr = parse(
        "mlp: t(1, -2, 0.5, -1e-3, 2., .25, true, false, \"s\", 'q', nf4, [1, [2, x], \"y\"], key=[],)"
    ).rules[0].expr
    assert shape(expr) == call(
        "t",
        (None, lit(1)), (None, lit(-2)), (None, lit(0.5)), (None, lit(-1e-3)), (None, lit(2.0)),
        (None, lit(0.25)), (None, lit(True)), (None, lit(False)), (None, lit("s")), (None, lit("q")),
        (None, word("nf4")),
        (None, ("list", (lit(1), ("list", (lit(2), word("x"))), lit("y")))),
        ("key", ("list", ())),
    )


# ----------------------------------------------------------------------------------------- let


def test_let_constants_are_substituted():
    spec = parse("let R = 16\nlet kind = ntk_dynamic\nlet adapter = lora(r=R) | ia3\n"
                 "attn: rope(kind, scale=4)\nmlp.down: adapter; mlp.up: lora(r=R)")
    assert shape(spec) == (
        ((role(("attn", None)),), call("rope", (None, word("ntk_dynamic")), ("scale", lit(4)))),
        ((role(("mlp", None), ("down", None)),), ("par", (call("lora", ("r", lit(16))), word("ia3")))),
        ((role(("mlp", None), ("up", None)),), call("lora", ("r", lit(16)))),
    )
    # A substituted value keeps its own span (the definition), so errors about it point there.
    value = spec.rules[2].expr.args[0].value
    assert text_at(spec.source, value.span) == "16" and value.span.line == 1


def test_let_applies_only_after_its_definition_and_not_to_calls():
    spec = parse("attn: lora(r=R)\nlet R = 4\nmlp: lora(r=R) + R(x=1)")
    assert shape(spec.rules[0].expr) == call("lora", ("r", word("R")))
    assert shape(spec.rules[1].expr) == ("seq", (call("lora", ("r", lit(4))), call("R", ("x", lit(1)))))


def test_let_redefinition_is_an_error():
    assert error("let R = 4\nattn: lora(r=R)\nlet R = 8") == (
        "<spec>:3:1\n"
        "  let R = 8\n"
        "  ^^^^^^^^^\n"
        "error: 'R' is already defined"
    )


def _chain(n: int, op: str) -> str:
    """``let A0 = lora`` and n−1 constants, each built from the previous: ``A{i} = A{i-1} op …``."""
    rhs = "{prev} + ia3" if op == "+" else "{prev} | {prev}"
    return "let A0 = lora\n" + "".join(f"let A{i} = " + rhs.format(prev=f"A{i - 1}") + "\n" for i in range(1, n))


def test_let_is_bounded_in_depth_as_if_written_out():
    # Each link nests the chain one level deeper, as ((lora + ia3) + ia3) + … would written out.
    ok = parse(_chain(MAX_NESTING + 2, "+") + f"attn: A{MAX_NESTING + 1}")
    assert shape(ok.rules[0].expr)[0] == "seq"
    # Thousands of links were a RecursionError; the error points at the use that goes too deep.
    message = error(_chain(3000, "+") + "attn: A2999")
    assert message.startswith(f"<spec>:{MAX_NESTING + 3}:11\n  let A{MAX_NESTING + 2} = A{MAX_NESTING + 1} + ia3\n"
                              "            ^^^\n")
    assert message.endswith(f"error: expressions nest more than {MAX_NESTING} levels deep once let constants "
                            f"are substituted ('A{MAX_NESTING + 1}' alone nests {MAX_NESTING})")
    # A rule that goes too deep with a constant that does not: the error points at the use.
    message = error(_chain(MAX_NESTING + 1, "+") + f"attn: lora + (A{MAX_NESTING} + ia3)")
    assert message.startswith(f"<spec>:{MAX_NESTING + 2}:15\n")
    assert message.endswith(f"('A{MAX_NESTING}' alone nests {MAX_NESTING - 1})")


def test_let_is_bounded_in_size_without_writing_it_out():
    # A constant used twice in the next doubles: 20 links stand for 2^20 calls, 60 for 2^60.
    for n in (20, 60):
        assert error(_chain(n, "|") + f"attn: A{n - 1}") == (
            "<spec>:14:17\n"
            "  let A13 = A12 | A12\n"
            "                  ^^^\n"
            f"error: 'A13' holds more than {MAX_NODES:,} expression nodes once let constants are substituted "
            "('A12' alone has 8,191)"
        )
    # Within the bound per constant, the rules together are bounded too: the second use overdraws.
    assert error(_chain(13, "|") + "attn: A12\nmlp: A12").startswith("<spec>:15:6\n  mlp: A12\n       ^^^\n")
    assert len(parse(_chain(13, "|") + "attn: A12").rules) == 1
    # Written out, the same bound (a spec that size is a mistake): without a constant, no mention of one.
    assert error("attn: " + " + ".join(["lora"] * (MAX_NODES + 1))).endswith(
        f"error: this spec holds more than {MAX_NODES:,} expression nodes")


# -------------------------------------------------------------------------------------- errors


def test_error_unexpected_character():
    assert error("attn.q: lora(r=16)\nmlp.down: lora(r=$)", "spec.surg") == (
        "spec.surg:2:18\n"
        "  mlp.down: lora(r=$)\n"
        "                   ^\n"
        "error: syntax error: unexpected character '$'; expected a transform or value"
    )


def test_error_unexpected_token():
    assert error("attn lora") == (
        "<spec>:1:6\n"
        "  attn lora\n"
        "       ^\n"
        "error: syntax error: unexpected 'lora'; expected ',', '.', ':', '['"
    )


def test_error_missing_close_paren():
    assert error("attn: lora(r=16   # rank\n\n") == (
        "<spec>:1:16\n"
        "  attn: lora(r=16   # rank\n"
        "                 ^\n"
        "error: syntax error: the spec ends; expected ')', ','"
    )
    assert error("attn: lora(r=16\nmlp: ia3") == (
        "<spec>:2:1\n"
        "  mlp: ia3\n"
        "  ^\n"
        "error: syntax error: unexpected 'mlp'; expected ')', ','"
    )
    assert error("attn: (lora | ia3") == (
        "<spec>:1:18\n"
        "  attn: (lora | ia3\n"
        "                   ^\n"
        "error: syntax error: the spec ends; expected ')'"
    )


def test_error_unterminated_string():
    assert error('attn: lora(init="kaiming)\nmlp: ia3') == (
        "<spec>:1:17\n"
        '  attn: lora(init="kaiming)\n'
        "                  ^\n"
        'error: syntax error: unterminated string; add the closing " on this line'
    )


def test_error_two_rules_on_one_line():
    assert error("attn: lora mlp.down: ia3") == (
        "<spec>:1:12\n"
        "  attn: lora mlp.down: ia3\n"
        "             ^^^^^^^^^^^^^\n"
        "error: expected ';' or a newline before this rule"
    )
    assert error("let R = 4 attn: lora(r=R)").startswith("<spec>:1:11\n")


def test_error_empty_argument():
    assert error("attn: lora(r=16,,alpha=2)") == (
        "<spec>:1:17\n"
        "  attn: lora(r=16,,alpha=2)\n"
        "                  ^\n"
        "error: syntax error: unexpected ','; expected ')', a transform or value"
    )
    assert error("attn: lora(r=)") == (
        "<spec>:1:14\n"
        "  attn: lora(r=)\n"
        "               ^\n"
        "error: syntax error: unexpected ')'; expected a transform or value"
    )


def test_error_caret_follows_tabs():
    assert error("attn: lora\n\t mlp ia3") == (
        "<spec>:2:7\n"
        "  \t mlp ia3\n"
        "  \t     ^\n"
        "error: syntax error: unexpected 'ia3'; expected ',', '.', ':', '['"
    )


def test_error_line_numbers_count_only_newlines():
    # A form feed is white space, not a line break: the error is on line 2 of the parser's count.
    message = error("attn: lora\x0c\nmlp: ia3 $")
    assert message.startswith("<spec>:2:10\n  mlp: ia3 $\n           ^\n")


def test_error_nesting_too_deep():
    ok = "mlp: " + "(" * MAX_NESTING + "lora" + ")" * MAX_NESTING
    assert shape(parse(ok).rules[0].expr) == word("lora")
    for text in ("mlp: " + "(" * 400 + "lora" + ")" * 400,
                 "mlp: t(x=" + "[" * 400 + "]" * 400 + ")",
                 "mlp: " + "g(" * 400 + "1" + ")" * 400):
        message = error(text)
        assert f"error: expressions nest more than {MAX_NESTING} levels deep" in message
        assert message.startswith("<spec>:1:")


def test_error_numbers_out_of_range():
    assert error("attn: t(x=-1e999)") == (
        "<spec>:1:11\n  attn: t(x=-1e999)\n            ^^^^^^\nerror: number too large for a float"
    )
    message = error("layers[" + "9" * 5000 + "]: lora")
    assert message.startswith("<spec>:1:7\n") and message.endswith("error: number too long: at most 4300 digits")
    assert shape(parse("attn: t(1e308, 1.5e-3, 2.e5, .5E+2)").rules[0].expr) == call(
        "t", (None, lit(1e308)), (None, lit(1.5e-3)), (None, lit(2e5)), (None, lit(50.0)))


def test_parse_file_names_the_file(tmp_path):
    path = tmp_path / "bad.surg"
    path.write_text("attn: lora\nmlp ia3\n")
    with pytest.raises(SpecError) as info:
        parse_file(path)
    assert str(info.value).startswith(f"{path}:2:5\n  mlp ia3\n      ^\n")
    with pytest.raises(SpecError, match="cannot read spec"):
        parse_file(tmp_path / "missing.surg")


# --------------------------------------------------------------------------------------- spans


def test_spans_point_at_their_text():
    source = "# header\nlet R = 16\nattn.*: rope(ntk_dynamic, scale=4) + window(4096, sinks=4)\n" \
             "  layers[0:2].mlp.down, \"lm_head\": lora(r=R,\n      alpha=32) | ia3"
    spec = parse(source)
    first, second = spec.rules
    assert text_at(source, first.span) == "attn.*: rope(ntk_dynamic, scale=4) + window(4096, sinks=4)"
    assert text_at(source, first.selectors[0].span) == "attn.*"
    seq = first.expr
    assert text_at(source, seq.span) == "rope(ntk_dynamic, scale=4) + window(4096, sinks=4)"
    rope, window = seq.items
    assert text_at(source, rope.span) == "rope(ntk_dynamic, scale=4)"
    assert [text_at(source, a.span) for a in rope.args] == ["ntk_dynamic", "scale=4"]
    assert [text_at(source, a.value.span) for a in rope.args] == ["ntk_dynamic", "4"]
    assert text_at(source, window.args[1].span) == "sinks=4"
    assert [text_at(source, s.span) for s in second.selectors] == ["layers[0:2].mlp.down", '"lm_head"']
    par = second.expr
    assert text_at(source, par.span) == "lora(r=R,\n      alpha=32) | ia3"
    lora, ia3 = par.items
    assert text_at(source, lora.span) == "lora(r=R,\n      alpha=32)"
    assert (lora.span.line, lora.span.end_line) == (4, 5)
    assert text_at(source, lora.args[1].span) == "alpha=32"
    assert text_at(source, ia3.span) == "ia3"
    assert text_at(source, second.span).startswith("layers[0:2]") and text_at(source, second.span).endswith("ia3")


def test_span_of_lists_and_groups():
    source = "mlp: t(x=[1, \"two\", [3]]) + (a | b)"
    seq = parse(source).rules[0].expr
    t, group = seq.items
    value = t.args[0].value
    assert text_at(source, value.span) == '[1, "two", [3]]'
    assert [text_at(source, i.span) for i in value.items] == ["1", '"two"', "[3]"]
    assert text_at(source, group.span) == "a | b"


# ---------------------------------------------------------------------------------------- docs


def _doc_blocks():
    return re.findall(r"```surg\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_docs_have_examples():
    assert len(_doc_blocks()) >= 8  # the extraction works (a renamed fence would leave none)


def test_every_docs_example_parses():
    failures = []
    for i, block in enumerate(_doc_blocks()):
        try:
            spec = parse(block, f"docs/language.md example {i + 1}")
        except SpecError as e:
            failures.append(str(e))
            continue
        if not spec.rules:
            failures.append(f"example {i + 1} has no rule:\n{block}")
    assert not failures, "\n\n".join(failures)
