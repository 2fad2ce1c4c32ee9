"""The loss variants TRL's DPOTrainer no longer carries, checked against the
TRL code that still has them: conservative DPO (sigmoid with label
smoothing) and SimPO against TRL's CPOTrainer.cpo_loss (experimental/cpo,
the same formulas: CPO's logits are the policy log-ratio, which for DPO we
hand it as the difference of log-ratios; computed with the other TRL results
in test_trl_parity.py's TRL process), and the SFT term (pref_ftx) against
LLaMA-Factory's definition (the chosen responses' mean token NLL), on random
per-sequence log-probs. fp32; tolerance 1e-6 relative (same operations)."""

import pytest
import torch

from megatron.training.preference.loss import PairLogps, PreferenceSettings, preference_loss

BETA, SIMPO_BETA, GAMMA = 0.3, 2.0, 0.7


def random_logps():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 12, (2, 8), generator=g).float()
    policy = PairLogps(-20 * torch.rand(8, generator=g), -20 * torch.rand(8, generator=g), tokens[0], tokens[1])
    ref = PairLogps(policy.chosen + torch.randn(8, generator=g), policy.rejected + torch.randn(8, generator=g),
                    tokens[0], tokens[1])
    return policy, ref


def cpo_calls():
    """The cpo_loss calls the tests below compare with: (loss type, beta, smoothing, gamma, chosen, rejected)."""
    policy, ref = random_logps()
    calls = [("sigmoid", BETA, eps, 0.0, policy.chosen - ref.chosen, policy.rejected - ref.rejected)
             for eps in (0.0, 0.2)]
    return calls + [("simpo", SIMPO_BETA, eps, GAMMA, policy.chosen_mean, policy.rejected_mean) for eps in (0.0, 0.1)]


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_conservative_dpo_is_trls_label_smoothed_sigmoid(theirs, smoothing):
    policy, ref = random_logps()
    ours_losses, _ = preference_loss(PreferenceSettings("sigmoid", beta=BETA, label_smoothing=smoothing), policy, ref)
    want, _, _ = theirs["cpo"][("sigmoid", smoothing)]
    torch.testing.assert_close(ours_losses, want, rtol=1e-6, atol=1e-7)
    if smoothing:  # smoothing changes the loss: the flag is not ignored
        plain, _ = preference_loss(PreferenceSettings("sigmoid", beta=BETA), policy, ref)
        assert (plain - ours_losses).abs().max() > 1e-3


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_is_trls_cpo_simpo_on_mean_token_logps(theirs, smoothing):
    policy, _ = random_logps()
    s = PreferenceSettings("simpo", beta=SIMPO_BETA, label_smoothing=smoothing, simpo_gamma=GAMMA)
    ours_losses, metrics = preference_loss(s, policy, None)
    want, chosen_rewards, rejected_rewards = theirs["cpo"][("simpo", smoothing)]
    torch.testing.assert_close(ours_losses, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(metrics["rewards/chosen"], chosen_rewards.mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(metrics["rewards/margins"], (chosen_rewards - rejected_rewards).mean(),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "simpo"])
def test_pref_ftx_adds_llama_factorys_sft_term(loss):
    policy, ref = random_logps()
    plain, _ = preference_loss(PreferenceSettings(loss), policy, ref)
    with_sft, _ = preference_loss(PreferenceSettings(loss, ftx=0.5), policy, ref)
    torch.testing.assert_close(with_sft - plain, 0.5 * -(policy.chosen / policy.chosen_tokens), rtol=1e-6, atol=1e-6)
