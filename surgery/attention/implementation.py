"""Installing programs on attention modules, and the one attention implementation that runs them.

:func:`install` adds a stage to the program of each given attention module, through the ``Edit``
journal: the program is a module attribute (``surgery_attention``), a forward pre-hook prepares
each call, and the model is switched with transformers' public ``set_attn_implementation`` to
``"surgery"``, registered (attention function and mask function) the first time a program is
installed, not when this module is imported. Rolling the edit back restores the previous
implementation. Attention modules without a program run plain causal attention under the same name.

Per-call state is explicit: the pre-hook adds ``surgery_call`` (a :class:`Call`) to the module's
keyword arguments; transformers hands them on to the cache layer's ``update`` and to the attention
function. Nothing is stored on modules or in globals per call, so threads may share a model.
Options a caller may pass to the model (they reach the pre-hook the same way):
``surgery_reference=True`` runs the dense reference, ``surgery_tile=n`` sets the fast path's tile,
``surgery_record=True`` records the largest query–key distance on bounded cache layers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from surgery.attention import export, fast, internals, reference
from surgery.attention.cache import ProgramLayer
from surgery.attention.frame import Table
from surgery.attention.keys import Inputs
from surgery.attention.program import Program, Stage
from surgery.errors import ApplyError, SpecError

NAME = "surgery"
ATTR = "surgery_attention"
_LOCK = threading.Lock()


@dataclass(slots=True)
class Call:
    """What one attention call needs besides q, k, v (built by the pre-hook, passed as a kwarg).

    Built once per attention module per forward and never changed after: not ``frozen``, because a
    frozen dataclass sets each field through ``object.__setattr__`` (4× the cost of this one, and
    a decoding step builds one per layer)."""

    program: Program
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    layer: ProgramLayer | None = None
    pad: torch.Tensor | None = None     # [B] first real column of each row
    reference: bool = False
    tile: int = fast.TILE
    record: bool = False
    mask: object = None                 # the attention mask the module was given (its identity keys Shared)

    def anchor(self) -> tuple:
        """The call's tensors that values shared by the layers of a cache depend on (cache.Shared)."""
        cos, sin = self.position_embeddings or (None, None)
        return cos, sin, self.mask
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None  # the program's K/V prefix for this call
    prefix_weight: torch.Tensor | None = None  # [B, Tq] log-weight of the prefix per query (a gate)


# ------------------------------------------------------------------------------ per call

OPTIONS = frozenset(("surgery_reference", "surgery_tile", "surgery_record"))  # what a caller may pass


def _pads(mask) -> torch.Tensor | None:
    """First real column per row, from our key-padding mask ([B, 1, 1, K] bool)."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.ndim == 4 and mask.shape[2] == 1:
        return mask[:, 0, 0].int().argmax(-1)
    return None


def before_attention(module: nn.Module, args, kwargs):
    """Forward pre-hook of a module with a program: its cache layer, and the call's state as a kwarg.

    Runs once per attention module per forward, so a decoding step's fixed cost: it writes into the
    call's own `kwargs` (a fresh dict for every call, see ``nn.Module._call_impl``) instead of
    copying it, and a layer that is already this program's cache layer costs one identity check."""
    program: Program = getattr(module, ATTR).active(module.training)  # train-only stages drop out at inference
    options = {name[8:]: kwargs.pop(name) for name in OPTIONS & kwargs.keys()} if OPTIONS & kwargs.keys() else {}
    layer = None
    if program.cache is not None and (cache := internals.cache_of(kwargs)) is not None:
        layers = internals.cache_layers(cache, module.layer_idx)
        layer = layers[module.layer_idx]
        if type(layer) is not ProgramLayer or layer.policy is not program.cache:
            layer = _program_layer(module, program, layers)
    position_embeddings = kwargs.get("position_embeddings")
    if program.unrotated and position_embeddings is not None:
        # The module rotates q and k with what it is handed: the identity rotation leaves them un-rotated
        # (cos·x + sin·J(x) = x), in the forward and in whatever it caches.
        cos, sin = position_embeddings
        kwargs["position_embeddings"] = position_embeddings = (torch.ones_like(cos), torch.zeros_like(sin))
    if program.prefix is not None:  # resolved per call (a trainable prefix changes between calls)
        options["prefix"] = program.prefix.kv(module, kwargs)
        if program.prefix.gate is not None:  # per query, from this call's hidden states
            options["prefix_weight"] = program.prefix.gate(module, args, kwargs)
    mask = kwargs.get("attention_mask")
    pad = None if mask is None else _pads(mask) if layer is None else layer.shared.per_call(
        (*(position_embeddings or (None, None)), mask), ("pads",), lambda: _pads(mask))
    kwargs["surgery_call"] = Call(program, position_embeddings, layer, pad, mask=mask, **options)


def _program_layer(module: nn.Module, program: Program, layers: list) -> ProgramLayer:
    """The module's layer of the cache as a layer of `program`'s cache policy: installed on an empty
    layer, an ApplyError on one that holds tokens cached otherwise."""
    layer = layers[module.layer_idx]
    if not isinstance(layer, ProgramLayer):
        if layer.get_seq_length() > 0:
            raise ApplyError(f"the KV cache already holds {layer.get_seq_length()} tokens for layer "
                             f"{module.layer_idx} that were cached without {program.describe()}; "
                             "start from an empty cache")
        others = next((other.shared for other in layers if isinstance(other, ProgramLayer)), None)
        layer = layers[module.layer_idx] = ProgramLayer(program.cache, others)
    elif layer.policy != program.cache:
        raise ApplyError(f"the KV cache of layer {module.layer_idx} was built for {layer.policy}, "
                         f"not {program.cache}")
    return layer


def attention(module: nn.Module, query, key, value, attention_mask, *, scaling=None, dropout=0.0,
              surgery_call: Call | None = None, **kwargs):
    """The ``surgery`` attention implementation: run the module's program (plain attention if none)."""
    call = surgery_call or Call(Program())
    if torch.compiler.is_exporting() and (text := export.carried(call, attention_mask)) is not None:
        # One node in the exported graph instead of the program traced op by op (surgery.attention.export).
        return export.attend(text, call, query, key, value, attention_mask,
                             scaling if scaling is not None else module.scaling, dropout if module.training else 0.0), None
    program, layer = call.program, call.layer
    if layer is not None and layer.stepped is not None:  # a steady step, written in place (cache.Ring)
        if call.record:  # the ring holds the columns of layout (head, start), in another order
            x = Inputs(query, key, value, 0.0, head=layer.layout[0], start=layer.layout[1])
            layer.max_distance = max(layer.max_distance, _max_distance(program, x))
        keys, rotation = layer.stepped
        return fast.ring_step(query, keys, value, scaling if scaling is not None else module.scaling, rotation), None
    head, start = layer.layout if layer is not None else (0, 0)
    if layer is None:
        start = 0
    scaling = scaling if scaling is not None else module.scaling
    pad, key_ok, given, unpadded = call.pad, None, None, None
    if pad is not None:
        def real_keys():
            columns = attention_mask[:, 0, 0]
            ok = torch.cat([columns[:, :head], columns[:, start:start + key.shape[-2] - head]], dim=-1)
            return ok, (query.shape[-2] == 1 and not bool(pad.any()) and bool(ok.all()))  # for fast._steady
        key_ok, unpadded = real_keys() if layer is None else layer.shared.per_call(
            call.anchor(), ("keys", head, start, key.shape[-2], query.shape[-2]), real_keys)
    elif isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4:
        given = attention_mask[..., :key.shape[-2]]  # a 4D mask the caller built: honoured as given
    x = Inputs(query, key, value, scaling, head=head, start=start, pad=pad, key_ok=key_ok, given=given,
               dropout=dropout if module.training else 0.0, prefix=call.prefix, prefix_weight=call.prefix_weight,
               positions=kwargs.get("position_ids"), unpadded=unpadded,
               shared=None if layer is None else (layer.shared, call.anchor()))
    rotated = None
    frame = program.frame
    if frame is not None:
        if call.position_embeddings is None:
            raise ApplyError(f"{program.describe()} needs the rotary cos/sin passed to the attention module")
        x.cos, x.sin = call.position_embeddings
        x.k_raw = layer is not None and layer.policy.pre_rope and layer.returned_raw
        x.table = (layer.frame_table(frame.rotary(), frame.size, query) if layer is not None
                   else Table.of(frame.rotary(), frame.size, query))
        if x.k_raw:
            rotated = layer.frame_inputs()
    if layer is not None and call.record:
        layer.max_distance = max(layer.max_distance, _max_distance(program, x))
    if call.reference:
        out = reference.attend(program, x)
    else:
        out = fast.attend(program, x, tile=call.tile, rotated=rotated)
    return out, None


def _max_distance(program: Program, x: Inputs) -> int:
    """Largest distance between a query and a key it sees, in the positions its rotary frame uses."""
    pad = x.pads()[:, None, None]
    i = x.query_columns()[None, :, None] - pad
    j = x.key_columns()[None, None, :] - pad
    visible = program.visible(i, j) & (j >= 0) & (i >= 0)
    distance = i - j
    if program.frame is not None:  # sinks sit at their slots, the query at min(i, size − 1)
        distance = torch.where(j < program.frame.sinks, i.clamp(max=program.frame.size - 1) - j, distance)
    return int(distance[visible].max()) if visible.any() else 0


def key_padding(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                attention_mask=None, **kwargs):
    """The ``surgery`` mask function: the 2D padding mask as [B, 1, 1, K] bool (None without padding).

    Programs apply causality and their rules themselves, per tile, so no [Q, K] mask is built."""
    if attention_mask is None:
        return None
    columns = attention_mask[:, kv_offset:kv_offset + kv_length].bool()
    if columns.shape[-1] < kv_length:  # a mask shorter than the stream: the missing columns are real
        columns = torch.nn.functional.pad(columns, (0, kv_length - columns.shape[-1]), value=True)
    return columns[:, None, None, :]


# ------------------------------------------------------------------------------ installing


def ensure_registered() -> None:
    with _LOCK:
        if not internals.registered(NAME):
            internals.register(NAME, attention, key_padding)


def require_causal(doing: str, target, module: nn.Module) -> None:
    """Every attention stage assumes a causal decoder; `doing` says why ("window(...) limits how far
    back a causal decoder looks"). A SpecError naming the module otherwise."""
    if not getattr(module, "is_causal", False):
        raise SpecError(f"{doing}, but {target.path} ({type(module).__name__}) attends in both directions")


def require_layer_index(name: str, target, module: nn.Module) -> None:
    """A stage with its own cache layer needs the module's KV-cache layer index."""
    if not isinstance(getattr(module, "layer_idx", None), int):
        raise SpecError(f"{name}(...) needs the attention module's KV-cache layer index; "
                        f"{type(module).__name__} at {target.path} has none")


def install(edit, model: nn.Module, modules: list[nn.Module], stage: Stage) -> None:
    """Add `stage` to the program of each of `modules` and run `model` on the ``surgery`` implementation."""
    if not internals.can_switch(model):
        raise ApplyError(f"{type(model).__name__} does not dispatch attention through transformers' "
                         "AttentionInterface, so attention stages cannot be installed")
    for module in modules:
        program = getattr(module, ATTR, None)
        if program is None:
            edit.set_attr(module, ATTR, Program((stage,)))
            edit.hook(module.register_forward_pre_hook(before_attention, with_kwargs=True))
        else:
            try:
                edit.set_attr(module, ATTR, program.then(stage))
            except ValueError as e:
                raise ApplyError(str(e)) from None
    current = model.config._attn_implementation
    if current != NAME:
        ensure_registered()
        model.set_attn_implementation(NAME)
        edit.on_rollback(lambda: model.set_attn_implementation(current))
        if model.config._attn_implementation != NAME:
            raise ApplyError(f"{type(model).__name__} did not switch to the '{NAME}' attention implementation")
