"""Preference losses from per-sequence log-probs, as TRL's DPOTrainer (and
LLaMA-Factory, for pref_ftx and SimPO) compute them.

A sequence's log-prob is the sum, over its response tokens, of log p(token |
everything before it): minus the per-token cross-entropy megatron-core's
GPTModel returns with labels (vocab-parallel under TP, padding rows excluded).
With d = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)), per pair:

    sigmoid  -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)     DPO; eps = --dpo-label-smoothing
                                                                         (conservative DPO; TRL 0.x's "sigmoid")
    hinge    relu(1 - beta d)                                              SLiC
    ipo      (d_c / |c| - d_r / |r| - 1 / (2 beta))^2                      IPO, per-token log-ratios (TRL)
    simpo    -(1 - eps) log sigmoid(m) - eps log sigmoid(-m),              reference-free, length-normalised;
             m = beta (log pi(c) / |c| - log pi(r) / |r|) - gamma          TRL's CPO "simpo", LLaMA-Factory
    + pref_ftx x (-log pi(c) / |c|)                                        LLaMA-Factory's SFT term on chosen

|c|, |r|: response tokens. Metrics, named as TRL logs them: rewards/chosen
and rewards/rejected (beta x the log-ratio; SimPO: beta x the per-token
log-prob, as CPO), rewards/accuracies (share of pairs whose chosen reward is
strictly higher), rewards/margins, logps/chosen and logps/rejected (summed
policy log-probs); each a mean over the pairs.
"""

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreferenceSettings:
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    ftx: float = 0.0
    simpo_gamma: float = 0.5


@dataclass
class PairLogps:
    """Per pair: summed response log-probs of chosen and rejected, and their response token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    @property
    def chosen_mean(self) -> torch.Tensor:
        return self.chosen / self.chosen_tokens.clamp(min=1)

    @property
    def rejected_mean(self) -> torch.Tensor:
        return self.rejected / self.rejected_tokens.clamp(min=1)


def sequence_logps(per_token_nll: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[sequences] summed log-probs of the masked tokens, from per-token
    negative log-likelihoods [sequences, positions] (fp32)."""
    return -(per_token_nll.float() * loss_mask.float()).sum(dim=-1)


def _smoothed_sigmoid(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def _sigmoid(s: PreferenceSettings, pi: PairLogps, ref: PairLogps) -> torch.Tensor:
    return _smoothed_sigmoid(s.beta * _delta(pi, ref), s.label_smoothing)


def _hinge(s: PreferenceSettings, pi: PairLogps, ref: PairLogps) -> torch.Tensor:
    return torch.relu(1.0 - s.beta * _delta(pi, ref))


def _ipo(s: PreferenceSettings, pi: PairLogps, ref: PairLogps) -> torch.Tensor:
    per_token = ((pi.chosen - ref.chosen) / pi.chosen_tokens.clamp(min=1)
                 - (pi.rejected - ref.rejected) / pi.rejected_tokens.clamp(min=1))
    return (per_token - 1.0 / (2.0 * s.beta)) ** 2


def _simpo(s: PreferenceSettings, pi: PairLogps, ref: Optional[PairLogps]) -> torch.Tensor:
    return _smoothed_sigmoid(s.beta * (pi.chosen_mean - pi.rejected_mean) - s.simpo_gamma, s.label_smoothing)


def _delta(pi: PairLogps, ref: PairLogps) -> torch.Tensor:
    return (pi.chosen - ref.chosen) - (pi.rejected - ref.rejected)


# name -> (per-pair loss, whether it compares with a reference model)
LOSSES: Dict[str, Tuple[Callable, bool]] = {
    "sigmoid": (_sigmoid, True),
    "hinge": (_hinge, True),
    "ipo": (_ipo, True),
    "simpo": (_simpo, False),
}
# the losses --dpo-label-smoothing applies to
SMOOTHED = ("sigmoid", "simpo")


def uses_reference(loss: str) -> bool:
    return LOSSES[loss][1]


def preference_loss(s: PreferenceSettings, pi: PairLogps,
                    ref: Optional[PairLogps]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(per-pair losses [pairs], metrics: detached means over the pairs)."""
    loss_fn, needs_reference = LOSSES[s.loss]
    losses = loss_fn(s, pi, ref)
    if s.ftx > 0:
        losses = losses + s.ftx * -pi.chosen_mean
    with torch.no_grad():
        if needs_reference:
            chosen_rewards = s.beta * (pi.chosen - ref.chosen)
            rejected_rewards = s.beta * (pi.rejected - ref.rejected)
        else:
            chosen_rewards, rejected_rewards = s.beta * pi.chosen_mean, s.beta * pi.rejected_mean
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": pi.chosen.detach().mean(),
            "logps/rejected": pi.rejected.detach().mean(),
        }
    return losses, metrics
