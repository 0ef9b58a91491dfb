"""Selectors → regions: the concrete module paths a rule's selector names in one model.

Semantics (docs/language.md has the user-facing version):

* ``attn.q`` — an unqualified layer role means that role in every decoder layer.
* ``layers[3]``, ``layers[0:8]``, ``layers[-4:]`` restrict the layers; ``layers[0:8].mlp`` narrows further.
* ``X.*`` selects role ``X`` together with all of its sub-roles (``attn.*`` = attn, attn.q, …).
  ``*`` as a segment matches any role at that depth; ``*`` alone is the whole model.
* ``embed``, ``norm``, ``rotary``, ``lm_head``, ``model`` are model-level roles; ``generate`` is the
  model's generation (``model.generate``), which only decoding transforms attach to.
* A quoted selector is an ``fnmatch`` pattern over the model's own module names.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass

from torch import nn

from surgery.arch import Architecture, backbone_prefix, no_role_map
from surgery.errors import SpecError, did_you_mean
from surgery.syntax import ast

GENERATE = "generate"  # the role of the model's generation: the decoding anchor (no module)


@dataclass(frozen=True)
class Site:
    """One selected module: its path in the model and the role it plays (None for raw paths)."""

    path: str
    role: str | None
    layer: int | None = None


@dataclass(frozen=True)
class Region:
    """What one selector selected: its modules, in the model's own order, each once."""

    selector: ast.Selector
    sites: tuple[Site, ...]


class RoleIndex:
    """Every role of one model instance, by module path and back."""

    def __init__(self, model: nn.Module, arch: Architecture):
        self.model, self.arch = model, arch
        self.modules = dict(model.named_modules())
        self.order = {path: i for i, path in enumerate(self.modules)}
        prefix = backbone_prefix(model)
        self.layers_path = prefix + arch.layers
        layers = self.modules.get(self.layers_path) if arch.mapped else None
        self.num_layers = len(layers) if layers is not None else 0
        # `generate`: how the model generates (the decoding anchor), a role of the whole model, no module.
        self.model_roles: dict[str, list[str]] = {"model": [""], GENERATE: [""]}
        for role, rel in arch.model.items():
            if prefix + rel in self.modules:
                self.model_roles[role] = [prefix + rel]
        for role, rel in arch.head.items():
            if rel in self.modules:
                self.model_roles[role] = [rel]
        self.role_of: dict[str, tuple[str, int | None]] = {}
        for role, paths in self.model_roles.items():
            for p in paths:
                self.role_of.setdefault(p, (role, None))
        for i in range(self.num_layers):
            self.role_of[f"{self.layers_path}.{i}"] = ("layer", i)
            for role in arch.layer:
                for p in self.layer_role_paths(role, i):
                    self.role_of[p] = (role, i)

    @property
    def head_paths(self) -> set[str]:
        """The output head(s): the mapped head roles, and the model's output embeddings."""
        heads = {p for role in self.arch.head for p in self.model_roles.get(role, [])}
        get = getattr(self.model, "get_output_embeddings", None)
        output = get() if callable(get) else None
        return heads | {p for p, m in self.modules.items() if output is not None and m is output}

    def example_path(self) -> str:
        """A quoted selector for this model: its first linear layer's path, layer number globbed."""
        from surgery.layers import is_linear

        path = next((p for p, m in self.modules.items() if is_linear(m) and p not in self.head_paths), "")
        return re.sub(r"\.\d+\.", ".*.", path, count=1)

    def layer_role_paths(self, role: str, i: int) -> list[str]:
        return [f"{self.layers_path}.{i}.{rel}" for rel in self.arch.layer_paths(role)
                if f"{self.layers_path}.{i}.{rel}" in self.modules]

    def all_role_names(self) -> list[str]:
        return sorted({"layers", *self.arch.layer, *self.model_roles})

    def suggest(self, text: str) -> str:
        """A did-you-mean for a role selector `text` that matched nothing in this model.

        Within a parent role (``attn.…``), a sibling whose last name contains the missing one, or
        is contained in it, comes first: GPT-2 fuses q, k and v in ``attn.qkv``, so ``attn.q``
        there suggests ``attn.qkv``, and ``attn.qkv`` on Llama suggests ``attn.q``, ``attn.k``,
        ``attn.v``; then close spellings of the last name; then the parent's sub-roles. A name
        without a known parent is compared with roles of the same depth, then all roles; failing
        that, the top-level roles this model has are listed.
        """
        roles = list(dict.fromkeys([*self.arch.layer, *self.model_roles, "layers"]))
        parent, _, last = text.rpartition(".")
        siblings = {r.rpartition(".")[2]: r for r in roles if parent and r.rpartition(".")[0] == parent}
        if siblings and last != "*":
            fused = [r for name, r in siblings.items() if last in name]
            parts = sorted((r for name, r in siblings.items() if name in last),
                           key=lambda r: last.index(r.rpartition(".")[2]))
            close = [siblings[n] for n in difflib.get_close_matches(last, siblings, n=3, cutoff=0.5)]
            if fused or parts or close:
                return " (did you mean " + " or ".join(repr(r) for r in fused or parts or close) + "?)"
            return f" ({parent!r} has " + ", ".join(repr(r) for r in siblings.values()) + ")"
        depth = text.count(".")
        for choices in ([r for r in roles if r.count(".") == depth], roles):  # same depth first
            near = did_you_mean(text, choices)
            if near.startswith(" (did you mean"):
                return near
        return " (its roles are " + ", ".join(sorted({r.split(".")[0] for r in roles})) + ")"

    def site(self, path: str) -> Site:
        role, layer = self.role_of.get(path, (None, None))
        return Site(path, role, layer)


def _layer_ids(index: ast.Index | None, n: int, span) -> list[int]:
    if index is None:
        return list(range(n))
    if not index.is_slice:
        i = index.start
        if not -n <= i < n:
            raise SpecError(f"layer index {i} is out of range: the model has {n} layers (0..{n - 1})", span)
        return [i % n]
    ids = list(range(n))[slice(index.start, index.stop)]
    if not ids:
        raise SpecError(f"layer slice selects no layer: the model has {n} layers (0..{n - 1})", span)
    return ids


def _match_roles(pattern: list[str], roles: list[str]) -> list[str]:
    """Roles matching a dotted pattern; a trailing '*' also matches the parent role itself."""
    out = []
    for role in roles:
        parts = role.split(".")
        if pattern[-1] == "*" and len(pattern) > 1 and parts == pattern[:-1]:
            out.append(role)
        elif len(parts) >= len(pattern) and all(p == "*" or p == q for p, q in zip(pattern, parts)):
            if len(parts) == len(pattern) or pattern[-1] == "*":
                out.append(role)
    return out


def resolve(selector: ast.Selector, index: RoleIndex) -> Region:
    """The region `selector` names in the indexed model; a selector matching nothing is an error."""
    if isinstance(selector, ast.RawSelector):
        paths = [p for p in index.modules if p and fnmatch.fnmatchcase(p, selector.pattern)]
        if not paths:
            near = did_you_mean(selector.pattern, [p for p in index.modules if p])
            raise SpecError(f"module path {selector.pattern!r} matches no module{near}", selector.span)
        return Region(selector, tuple(index.site(p) for p in paths))  # model order already

    segments = list(selector.segments)
    span = selector.span
    if segments[0].name == "*" and len(segments) == 1:
        return Region(selector, (Site("", "model"),))
    if not index.arch.mapped and str(selector) not in ("model", GENERATE):
        example = index.example_path()
        raise SpecError(f"role selector {str(selector)!r} needs a role map: {no_role_map(index.arch)}, or select "
                        "modules by quoted path" + (f', e.g. "{example}"' if example else ""), span)
    layer_ids = list(range(index.num_layers))
    if segments[0].name == "layers":
        layer_ids = _layer_ids(segments[0].index, index.num_layers, span)
        segments = segments[1:]
        if not segments:
            return Region(selector, tuple(index.site(f"{index.layers_path}.{i}") for i in layer_ids))
    elif segments[0].index is not None:
        raise SpecError(f"only 'layers' takes an index, not {segments[0].name!r}", span)
    if any(s.index is not None for s in segments):
        raise SpecError("only 'layers' takes an index", span)
    pattern = [s.name for s in segments]

    sites: list[Site] = []
    if len(layer_ids) == index.num_layers and selector.segments[0].name != "layers":
        for role in _match_roles(pattern, sorted(index.model_roles)):
            sites += [Site(p, role) for p in index.model_roles[role]]  # `generate` and `model` share ""
    for role in _match_roles(pattern, sorted(index.arch.layer)):
        for i in layer_ids:
            sites += [Site(p, role, i) for p in index.layer_role_paths(role, i)]
    if not sites:
        mapped = _match_roles(pattern, sorted(index.arch.layer))
        if mapped:  # the role exists, its module does not: suggesting the same name would be no help
            where = ", ".join(f"{role} at {index.layers_path}.N.{rel}" for role in mapped[:3]
                              for rel in index.arch.layer_paths(role))
            raise SpecError(f"selector {str(selector)!r} names roles of the {index.arch.name} role map ({where}), "
                            "but this model has no such module there", span)
        raise SpecError(
            f"selector {str(selector)!r} matches nothing in this {index.arch.name} model"
            f"{index.suggest('.'.join(pattern))}",
            span,
        )
    # In the model's own order (layer by layer), each module once.
    ordered = sorted(dict.fromkeys(sites), key=lambda site: index.order.get(site.path, -1))
    return Region(selector, tuple(ordered))
