"""Merging rows that differ only in a layer index (``model.layers.{0-29}.mlp.down_proj``)."""

from __future__ import annotations

import re


def _ranges(values: list[int]) -> str:
    values = sorted(set(values))
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _shape(path: str) -> tuple:
    return tuple(None if part.isdigit() else part for part in path.split("."))


def group_label(paths: list[str]) -> str:
    """One label for paths of the same shape: numeric segments become ``{0-3,5}`` where they vary."""
    members = [p.split(".") for p in paths]
    label = []
    for i, part in enumerate(_shape(paths[0])):
        if part is not None:
            label.append(part)
        else:
            values = [int(m[i]) for m in members]
            text = _ranges(values)
            label.append(text if len(set(values)) == 1 else "{" + text + "}")
    return ".".join(label)


def _grouped(rows: list[tuple[str, str, str]], group: bool) -> list[tuple[str, str, str]]:
    """Merge rows whose paths differ only in numeric segments and whose descriptions are equal."""
    if not group:
        return rows
    groups: dict[tuple, list[str]] = {}
    for sign, path, desc in rows:
        groups.setdefault((sign, _shape(path), desc), []).append(path)
    return [(sign, group_label(paths), desc) for (sign, _, desc), paths in groups.items()]


def layer_free(text: str, path: str) -> str:
    """`text` with `path`'s numeric segments written as ``{i}``, ``{j}``…: ``model.layers.3.mlp`` in a
    text about ``model.layers.3.mlp.down_proj`` becomes ``model.layers.{i}.mlp``, so that the same
    change in every layer reads the same and groups."""
    parts = path.split(".")
    letters = iter("ijklmn")
    for k, part in enumerate(parts):
        if part.isdigit():
            prefix = ".".join(parts[:k + 1])
            parts[k] = "{" + next(letters, "n") + "}"  # later prefixes contain the rewritten one
            # Only whole segments: model.layers.1 must not rewrite model.layers.12.
            text = re.sub(re.escape(prefix) + r"(?![\w])", lambda _, k=k: ".".join(parts[:k + 1]), text)
    return text
