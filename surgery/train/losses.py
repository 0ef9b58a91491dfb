"""T-Few's losses for (IA)³ (Liu et al. 2022, https://arxiv.org/abs/2205.05638, §3.2), on choice batches.

A batch of B multiple-choice examples with C answer choices each is C·B sequences ``x ⧺ yᶜ`` in
example-major order (rows b·C … b·C + C − 1 are example b's choices), with ``labels`` equal to the
tokens on the choice and −100 on the prompt and padding (transformers' convention: the logits at
position t predict the label at t + 1), and ``answer[b]`` the index of the correct choice.
With log p(yₜ | x, y₍<ₜ₎) the model's token log-probabilities and T(y) a choice's length:

    L_LM = − Σ_b Σ_t log p(y_t^b) / Σ_b T(y^b)                          the correct choices' tokens
    L_UL = − Σ_b Σ_{c≠answer} Σ_t log(1 − p(ŷ_t^{bc})) / Σ_b Σ_{c≠answer} T(ŷ^{bc})   unlikelihood
    β(x, y) = (1/T(y)) Σ_t log p(y_t)                                   length-normalised score
    L_LN = − (1/B) Σ_b log( exp β(x, y^b) / Σ_c exp β(x, ŷ^{bc}) )      softmax over the choices

and T-Few trains on L = L_LM + L_UL + L_LN. Unlikelihood pushes probability off the wrong choices'
tokens; length normalisation makes the choice ranking used at inference (highest β) the thing trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of every label token [N, T−1], its mask) with the causal shift; masked entries are 0."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != -100
    picked = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def tfew_losses(logits: torch.Tensor, labels: torch.Tensor, answer: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"lm", "ul", "ln"}`` of the module docstring for C·B sequences and B answers."""
    lp, mask = token_logprobs(logits, labels)
    batch = answer.shape[0]
    choices = lp.shape[0] // batch
    correct = F.one_hot(answer, choices).bool().reshape(-1)  # [C·B], example-major
    tokens = mask.sum(-1)
    lm = -lp[correct].sum() / tokens[correct].sum()
    # log(1 − p) = log(−expm1(log p)); log p is clamped just below 0 so a certain token stays finite.
    wrong = mask[~correct]
    log1m = torch.log(-torch.expm1(lp[~correct].clamp(max=-1e-6))) * wrong
    ul = -log1m.sum() / wrong.sum().clamp(min=1)
    beta = (lp.sum(-1) / tokens.clamp(min=1)).reshape(batch, choices)
    ln = F.cross_entropy(beta, answer)
    return {"lm": lm, "ul": ul, "ln": ln}


def tfew_loss(logits: torch.Tensor, labels: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """L_LM + L_UL + L_LN (see the module docstring)."""
    return sum(tfew_losses(logits, labels, answer).values())  # type: ignore[return-value]
