"""The `.surg` language: grammar, typed AST, parser."""

from surgery.syntax.parser import parse, parse_file

__all__ = ["parse", "parse_file"]
