"""AdaLoRA: an SVD-shaped low-rank update whose rank budget shrinks to the triplets that matter.

    y = W x + b + s · P (Λ ⊙ Q) x        s = α / (r_init + 10⁻⁵)

P ∈ ℝ^{out×r} (``lora_B``), Λ ∈ ℝ^{r} (``lora_E``, the "singular values"), Q ∈ ℝ^{r×in}
(``lora_A``), r = ``r_init``. Λ starts at 0 and P, Q at N(0, 0.02²), so the layer is unchanged at
init. PEFT's ``AdaLoraConfig`` is the reference; the semantics follow it exactly:

* Importance, after every optimizer step (gradients still present): for each entry w of P, Λ, Q,
  I = |w · ∂L/∂w|, the sensitivity Ī ← β₁ Ī + (1 − β₁) I and the uncertainty
  Ū ← β₂ Ū + (1 − β₂) |I − Ī|, score s(w) = Ī · Ū. Triplet i of a layer scores
  S_i = s(Λ_i) + mean_j s(Q_ij) + mean_k s(P_ki).
* Budget b(t) (triplets kept over all the step's layers, from r_init·n to r_target·n): b = r_init·n
  while t ≤ tinit; b = r_target·n after total_step − tfinal; in between the cubic
  b = ⌊(r_init·n − r_target·n)(1 − (t − tinit)/(total_step − tfinal − tinit))³ + r_target·n⌋, applied every
  ``delta_t`` steps: the r_init·n − b lowest-scoring triplets get Λ_i = 0. At t = total_step − tfinal the
  final pattern is fixed (and the statistics dropped); later steps re-apply it.
* Regulariser: L += orth_reg · mean over the P and Q of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F.

Zhang et al. 2023, https://arxiv.org/abs/2303.10512.

Obligations: identity at init (layer and model); merged == unmerged (Λ, P perturbed); zeroing a
singular value equals the explicitly truncated-rank update (the rank-(r−m) P, Λ, Q); unmerge
restores the weights bit-exactly.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from surgery.errors import SpecError
from surgery.layers import SurgeryLinear, features, linear_forward, linear_weight
from surgery.train.schedules import BaseSchedule
from surgery.transforms.registry import Anchor, Params, obligation, transform


class AdaLoraParams(Params):
    r_init: int = Field(12, ge=1, description="initial rank of every layer")
    r_target: int = Field(8, ge=1, description="average rank per layer once the budget has shrunk")
    total_step: int = Field(..., ge=1, description="optimizer steps of the run (the budget schedule's length)")
    tinit: int = Field(0, ge=0, description="steps at the full budget first")
    tfinal: int = Field(0, ge=0, description="steps at the final budget, pattern fixed, last")
    delta_t: int = Field(1, ge=1, description="steps between budget allocations")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA of the sensitivity")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA of the uncertainty")
    orth_reg: float = Field(0.5, ge=0, description="weight of the orthogonality regulariser")
    alpha: float | None = Field(None, gt=0, description="scale numerator; defaults to r_init (scale ≈ 1)")
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _budget(self) -> "AdaLoraParams":
        if self.r_target > self.r_init:
            raise ValueError(f"r_target={self.r_target} exceeds r_init={self.r_init}: the budget only shrinks")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit} leaves no steps to shrink the budget in before "
                             f"total_step - tfinal = {self.total_step - self.tfinal}")
        return self

    @property
    def scaling(self) -> float:
        return (self.r_init if self.alpha is None else self.alpha) / (self.r_init + 1e-5)


class AdaLoraAdapter(nn.Module):
    def __init__(self, in_features: int, out_features: int, p: AdaLoraParams, dtype, device):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(p.r_init, in_features, dtype=dtype, device=device))
        self.lora_E = nn.Parameter(torch.empty(p.r_init, 1, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, p.r_init, dtype=dtype, device=device))
        self.dropout = nn.Dropout(p.dropout) if p.dropout else nn.Identity()
        self.scaling = p.scaling
        if device != torch.device("meta"):
            nn.init.zeros_(self.lora_E)
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)

    def delta(self, x: torch.Tensor, inner) -> torch.Tensor:
        z = self.dropout(x.to(self.lora_A.dtype))
        return ((z @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling).to(x.dtype)

    def forward(self, x: torch.Tensor, inner) -> torch.Tensor:
        return inner(x) + self.delta(x, inner)

    def merge(self, weight: torch.Tensor, bias):
        update = self.lora_B @ (self.lora_A * self.lora_E) * self.scaling
        return weight + update.to(weight.dtype), bias


class AdaLoraSchedule(BaseSchedule):
    """Importance, budget and masking after each optimizer step; the orthogonality term in the loss.

    State: the sensitivity and uncertainty of every entry (tensors) and the last mask per layer.
    """

    def __init__(self, p: AdaLoraParams, targets, model: nn.Module):
        self.p = p
        self.paths = [t.path for t in targets]
        self.adapters: list[AdaLoraAdapter] = []
        for path in self.paths:
            layer = model.get_submodule(path)
            adapters = [m for m in layer.modules() if isinstance(m, AdaLoraAdapter)] if isinstance(
                layer, SurgeryLinear) else []
            if len(adapters) != 1:
                raise SpecError(f"adalora at {path}: expected one AdaLoRA adapter in the layer, found {len(adapters)}")
            self.adapters.append(adapters[0])
        self.init_budget = p.r_init * len(self.adapters)
        self.target_budget = p.r_target * len(self.adapters)
        self.reset()
        self.pattern: list[list[bool]] | None = None  # kept triplets per layer, once allocated

    def reset(self) -> None:
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    def _named(self):
        for path, adapter in zip(self.paths, self.adapters):
            for name in ("lora_A", "lora_E", "lora_B"):
                yield f"{path}.{name}", getattr(adapter, name)

    def budget(self, step: int) -> tuple[int, bool]:
        p = self.p
        if step <= p.tinit:
            return self.init_budget, False
        if step > p.total_step - p.tfinal:
            return self.target_budget, True
        shrink = 1 - (step - p.tinit) / (p.total_step - p.tfinal - p.tinit)
        return int((self.init_budget - self.target_budget) * shrink**3 + self.target_budget), step % p.delta_t == 0

    @torch.no_grad()
    def update_importance(self) -> None:
        for name, param in self._named():
            if param.grad is None:
                continue
            importance = (param * param.grad).abs()
            ema = self.sensitivity.get(name, torch.zeros_like(param)).to(param.device)
            ema = self.p.beta1 * ema + (1 - self.p.beta1) * importance
            unc = self.uncertainty.get(name, torch.zeros_like(param)).to(param.device)
            self.uncertainty[name] = self.p.beta2 * unc + (1 - self.p.beta2) * (importance - ema).abs()
            self.sensitivity[name] = ema

    def triplet_scores(self) -> list[torch.Tensor]:
        """S_i per layer (see the module docstring): [r] each."""
        def score(name: str) -> torch.Tensor:
            return self.sensitivity[name] * self.uncertainty[name]

        return [score(f"{path}.lora_E").view(-1) + score(f"{path}.lora_A").mean(dim=1)
                + score(f"{path}.lora_B").mean(dim=0) for path in self.paths]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        masked = self.init_budget - budget
        if masked <= 0 or not self.sensitivity:
            return
        scores = self.triplet_scores()
        threshold = torch.cat(scores).kthvalue(masked).values
        self.pattern = [(s > threshold).tolist() for s in scores]
        self.apply_pattern()

    @torch.no_grad()
    def apply_pattern(self) -> None:
        if self.pattern is None:
            return
        for adapter, keep in zip(self.adapters, self.pattern):
            mask = torch.tensor(keep, device=adapter.lora_E.device).view(-1, 1)
            adapter.lora_E.masked_fill_(~mask, 0.0)

    def on_step(self, step: int, optimizer) -> None:
        final = self.p.total_step - self.p.tfinal
        if step < final:
            self.update_importance()
            budget, allocate = self.budget(step)
            if allocate:
                self.mask_to_budget(budget)
        elif step == final:
            self.mask_to_budget(self.budget(step)[0])
            self.reset()
        else:
            self.apply_pattern()

    def loss(self, batch, outputs, loss: torch.Tensor) -> torch.Tensor:
        if self.p.orth_reg == 0:
            return loss
        terms = []
        for adapter in self.adapters:
            for cov in (adapter.lora_A @ adapter.lora_A.T, adapter.lora_B.T @ adapter.lora_B):
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        return loss + self.p.orth_reg * torch.stack(terms).mean()

    def state_dict(self) -> dict:
        return {"sensitivity": dict(self.sensitivity), "uncertainty": dict(self.uncertainty), "pattern": self.pattern}

    def load_state_dict(self, state) -> None:
        self.sensitivity = {k: v.clone() for k, v in state["sensitivity"].items()}
        self.uncertainty = {k: v.clone() for k, v in state["uncertainty"].items()}
        self.pattern = state["pattern"]


@transform("adalora", params=AdaLoraParams, anchor=Anchor.LINEAR, positional=("r_init", "r_target"),
           reference="https://arxiv.org/abs/2303.10512")
class AdaLoRA:
    """SVD-form LoRA whose rank budget shrinks to the most important triplets while training (base frozen)."""

    freezes_base = True

    def accepts(self, p: AdaLoraParams, target, module: nn.Module) -> bool:
        limit = min(features(module))
        if p.r_init > limit:
            raise SpecError(f"adalora() rank r_init={p.r_init} exceeds min(in, out) = {limit} of {target.path}")
        return True

    def adapter(self, p: AdaLoraParams, base: nn.Module, target) -> nn.Module:
        in_f, out_f = features(base)
        dtype = getattr(base, "compute_dtype", None) or linear_weight(base)[0].dtype
        return AdaLoraAdapter(in_f, out_f, p, dtype, next(base.parameters()).device)

    def schedule(self, p: AdaLoraParams, targets, model: nn.Module) -> AdaLoraSchedule:
        return AdaLoraSchedule(p, targets, model)

    def peft(self, p: AdaLoraParams, targets) -> dict:
        # The masked triplets are exported as zero singular values (no rank_pattern), which PEFT
        # loads at r_init with the same outputs.
        return {"peft_type": "ADALORA", "init_r": p.r_init, "target_r": p.r_target, "r": p.r_target,
                "total_step": p.total_step, "tinit": p.tinit, "tfinal": p.tfinal, "deltaT": p.delta_t,
                "beta1": p.beta1, "beta2": p.beta2, "orth_reg_weight": p.orth_reg,
                "lora_alpha": p.r_init if p.alpha is None else p.alpha, "lora_dropout": p.dropout,
                "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "rank_pattern": None}

    @staticmethod
    def _perturb(layer: SurgeryLinear, generator: torch.Generator) -> AdaLoraAdapter:
        adapter = next(m for m in layer.adapter.modules() if isinstance(m, AdaLoraAdapter))
        adapter.lora_E.normal_(generator=generator)
        return adapter

    @obligation("identity at init: layer output unchanged", tol=1e-6)
    def identity_layer(self, p, check) -> float:
        return check.layer_identity_error()

    @obligation("identity at init: model logits unchanged", tol=1e-5)
    def identity_model(self, p, check) -> float:
        return check.logits_identity_error()

    @obligation("merged == unmerged (singular values perturbed)", tol=1e-4)
    def merge_equal(self, p, check) -> float:
        errors = [0.0]
        for i, (_, layer, _) in enumerate(check.linear_layers()):
            with torch.no_grad():
                self._perturb(layer, check.generator(i))
                x = check.randn(3, layer.in_features, salt=i)
                unmerged = layer(x)
                layer.merge()
                merged = layer(x)
                layer.unmerge()
            errors.append(check.max_abs(merged, unmerged) / max(1.0, unmerged.abs().max().item()))
        return max(errors)

    @obligation("a zeroed singular value equals the truncated-rank update", tol=1e-5)
    def mask_equals_truncation(self, p, check) -> float:
        errors = [0.0]
        for i, (_, layer, original) in enumerate(check.linear_layers()):
            with torch.no_grad():
                adapter = self._perturb(layer, check.generator(i))
                if p.r_init < 2:
                    continue  # nothing to truncate to but the empty update, which identity covers
                keep = torch.rand(p.r_init, generator=check.generator(i + 1)) < 0.5
                keep[0], keep[-1] = True, False  # at least one kept and one masked
                adapter.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
                x = check.randn(3, layer.in_features, salt=i)
                masked = layer(x)
                a, e, b = adapter.lora_A[keep], adapter.lora_E[keep], adapter.lora_B[:, keep]
                truncated = linear_forward(x, original) + (x @ (a * e).T @ b.T) * adapter.scaling
            errors.append(check.max_abs(masked, truncated) / max(1.0, truncated.abs().max().item()))
        return max(errors)

    @obligation("unmerge restores the weights bit-exactly", tol=0.0)
    def unmerge_exact(self, p, check) -> float:
        errors = [0.0]
        for i, (_, layer, original) in enumerate(check.linear_layers()):
            with torch.no_grad():
                self._perturb(layer, check.generator(i))
                layer.merge()
                layer.unmerge()
                same = torch.equal(linear_weight(layer.base)[0], linear_weight(original)[0])
            errors.append(0.0 if same else 1.0)
        return max(errors)
