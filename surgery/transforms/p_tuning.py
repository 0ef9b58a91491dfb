"""P-tuning: virtual-token embeddings computed by a trainable prompt encoder, prepended at the input.

Where prompt tuning trains the n virtual embeddings P directly, p-tuning trains inputs U ∈ ℝ^{n×d}
and a prompt encoder f, and prepends P = f(U) exactly where prompt tuning puts its P:

    h = Backbone([f(U)₁ … f(U)_n, e(x₁) … e(x_T)])[n:]

with, as in PEFT's ``PromptEncoder`` (Liu et al. 2021, "GPT Understands, Too",
https://arxiv.org/abs/2103.10385; the paper's code uses h = d, PEFT's default, ours too):

* ``encoder=mlp``:  f(U) = W₃ ReLU(W₂ ReLU(W₁ U + b₁) + b₂) + b₃, hidden width h (d → h → h → d);
* ``encoder=lstm``: f(U) = W₂ ReLU(W₁ [→H; ←H] + b₁) + b₂, where [→H; ←H] ∈ ℝ^{n×2h} is a
  bidirectional LSTM of ``layers`` layers (``dropout`` between them, in training) run over the n
  rows of U as one sequence (2h → 2h → d), so every virtual token depends on all of U.

U starts N(0, 1) (an ``nn.Embedding``'s default, as PEFT's), the layers at torch's defaults; the base
model is frozen. f runs at every forward, in training and in inference, so the saved encoder is the
model (it reloads bit-exactly: :func:`surgery.load` re-applies the plan and loads every tensor).
Everything downstream of P — the backbone hooks, masks, positions, left padding, the KV cache,
learned position tables, the outputs cut to the real tokens — is prompt tuning's
(:mod:`surgery.transforms.prompt_tuning`), shared, not copied: the hooks ask the attached module
for its embeddings, and this one computes them.

PEFT export (``P_TUNING``, ``PromptEncoderConfig``): what PEFT itself saves for p-tuning, the
encoder's output f(U) ∈ ℝ^{n×d} under the key ``prompt_embeddings`` (computed in eval mode), with
the encoder's settings in the config. PEFT loads it for inference (``inference_mode``) into its
prompt encoder's ``embedding`` table and uses that table as the prompt, so its outputs equal ours;
as with PEFT's own saves, the encoder weights are not part of that format (resuming training in
PEFT starts a new encoder over the saved output).

Obligations (prompt tuning's, on the encoder's output, and the export's):

* length 0 is the identity: an encoder of n = 0 (no virtual token, f not run) under the same hooks,
  on a batch with a left-padded row.
* equals feeding the encoder's output embeddings by hand: the original fed ``inputs_embeds =
  [f(U); e(x)]``, unpadded and with a left-padded row placed as [padding, f(U), e(x)].
* prefill + token-by-token decode with the KV cache equals the full forward.
* left-padded batch equals each row alone (:meth:`surgery.verify.Check.padded_rows_error`).
* the exported embeddings reproduce the outputs: the PEFT export put in place of the encoder (as a
  prompt-tuning prompt, which is what PEFT runs) gives the same logits, on a left-padded batch.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from surgery.transforms.prompt_tuning import PromptEmbedding, VirtualTokens, VirtualTokenSteps, find_prompt, swapped
from surgery.transforms.registry import Anchor, Params, obligation, transform


class PTuningParams(Params):
    length: int = Field(..., ge=0, description="number of virtual tokens n")
    encoder: Literal["mlp", "lstm"] = "mlp"
    hidden: int | None = Field(None, ge=1, description="the encoder's hidden width h (default: the model's d)")
    layers: int = Field(2, ge=1, description="encoder=lstm: LSTM layers")
    dropout: float = Field(0.0, ge=0, lt=1, description="encoder=lstm: dropout between LSTM layers")

    @model_validator(mode="after")
    def _lstm_only(self):
        if self.encoder == "mlp" and (self.layers != 2 or self.dropout != 0):
            raise ValueError("layers and dropout set the LSTM encoder; the MLP encoder has three fixed layers")
        if self.dropout and self.layers == 1:
            raise ValueError("dropout acts between LSTM layers; with layers=1 there is none")
        return self


class PromptEncoder(VirtualTokens):
    """f(U): the trainable inputs U (``embedding``, [n, d]) and the encoder (``lstm_head``, ``mlp_head``),
    in float32 like PEFT's (the hooks cast the output to the model's dtype)."""

    technique = "p-tuning"

    def __init__(self, p: PTuningParams, hidden_size: int, device, max_positions: int | None = None):
        super().__init__(max_positions)
        d, h = hidden_size, p.hidden or hidden_size
        self.embedding = nn.Embedding(p.length, d, device=device)
        if p.encoder == "lstm":
            self.lstm_head = nn.LSTM(d, h, num_layers=p.layers, dropout=p.dropout, bidirectional=True,
                                     batch_first=True, device=device)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, device=device), nn.ReLU(),
                                          nn.Linear(2 * h, d, device=device))
        else:
            self.lstm_head = None
            self.mlp_head = nn.Sequential(nn.Linear(d, h, device=device), nn.ReLU(),
                                          nn.Linear(h, h, device=device), nn.ReLU(),
                                          nn.Linear(h, d, device=device))

    @property
    def length(self) -> int:
        return self.embedding.num_embeddings

    def embeddings(self) -> torch.Tensor:
        u = self.embedding.weight
        if self.length == 0:
            return u  # [0, d]: nothing to encode (an LSTM refuses an empty sequence)
        if self.lstm_head is not None:
            u = self.lstm_head(u.unsqueeze(0))[0][0]  # the n rows as one sequence
        return self.mlp_head(u)


@transform("p_tuning", params=PTuningParams, anchor=Anchor.EMBEDDINGS, positional=("length",),
           reference="https://arxiv.org/abs/2103.10385")
class PTuning(VirtualTokenSteps):
    """P-tuning: virtual tokens from a trainable prompt encoder (MLP or bi-LSTM), prepended to the inputs."""

    def virtual_tokens(self, p: PTuningParams, embed: nn.Module, max_positions: int | None) -> PromptEncoder:
        return PromptEncoder(p, embed.weight.shape[1], embed.weight.device, max_positions)

    def peft(self, p: PTuningParams, targets) -> dict:
        # token_dim, and encoder_hidden_size when None, PEFT fills from the base model's config when
        # it loads (both d, as ours); task_type is the saver's (io) to set.
        return {"peft_type": "P_TUNING", "num_virtual_tokens": p.length, "token_dim": None,
                "num_transformer_submodules": 1, "num_attention_heads": None, "num_layers": None,
                "encoder_reparameterization_type": p.encoder.upper(), "encoder_hidden_size": p.hidden,
                "encoder_num_layers": p.layers, "encoder_dropout": p.dropout, "inference_mode": True}

    def peft_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """PEFT's ``adapter_model.safetensors`` for p-tuning: the encoder's output f(U), [n, d], as
        computed at inference (no dropout)."""
        encoder = find_prompt(model)
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                return {"prompt_embeddings": encoder.embeddings().detach().clone()}
        finally:
            encoder.train(was_training)

    @obligation("the exported embeddings reproduce the outputs", tol=1e-6)
    def export_reproduces(self, p, check) -> float:
        """Prompt tuning's module holding the PEFT export, in place of the encoder: what PEFT runs."""
        ids = check.tokens(length=self._length(check, 16))
        mask = self._padded_mask(ids)
        encoder = find_prompt(check.surgered)
        exported = PromptEmbedding(self.peft_tensors(check.surgered)["prompt_embeddings"], encoder.max_positions)
        with swapped(check.surgered, exported):
            theirs = check.logits(check.surgered, ids, attention_mask=mask)
        return check.max_abs(theirs, check.logits(check.surgered, ids, attention_mask=mask))
