"""rba's RL library: rewards, advantages, KL and the policy loss, knowing nothing of audio,
models or the trainer, so any training loop can use it.

    from rba_core.rl import (
        Experience, RewardSpec, combine_rewards, group_advantages, token_advantages,
        combine_advantages, policy_loss, AdaptiveKLController)

    # Rollouts of B prompts x G samples, scored by the teacher (and the reference).
    exp = Experience(tokens, mask, old_logprobs, ref_logprobs=ref_lp, teacher_logprobs=t_lp,
                     metadata=rows)                                  # [B, G, T] tensors
    rewards = combine_rewards([RewardSpec("dense"), RewardSpec("chrf", weight=0.5)],
                              exp, responses)                         # responses[b][g]: str
    seq = group_advantages(rewards.sequence, kind="grpo")             # [B, G]
    tok = token_advantages(rewards.token, exp.mask, gamma=0.0)        # [B, G, T]
    exp.advantages = combine_advantages(seq, tok, exp.mask)
    kl_ctl = AdaptiveKLController(init_beta=0.04, target_kl=0.05, horizon=10_000)

    flat = exp.flatten()                                              # [B * G, T] rows
    for mb in flat.minibatches(8, generator=torch.Generator().manual_seed(seed)):
        hidden = my_model(mb.tokens)                                  # [n, T, D]
        loss, metrics = policy_loss(
            hidden, my_model.lm_head.weight, mb.tokens, mb.mask, mb.advantages,
            mb.old_logprobs, mb.ref_logprobs, beta=kl_ctl.beta, eps_low=0.2, eps_high=0.28,
            loss_type="dapo")
        loss.backward()
    kl_ctl.update(float(metrics["ref_kl_mean"]), n_steps=flat.num_rows)
"""
from .advantages import combine_advantages, group_advantages, token_advantages
from .kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_k1, kl_k2, kl_k3
from .loss import policy_loss
from .rewards import (
    REWARD_NAMES, ExternalReward, Rewards, RewardSpec, combine_rewards, dense_behavior_reward,
    load_external_reward, sequence_teacher_likelihood,
)
from .text_metrics import bleu, chrf, exact_match, normalize_answer, token_f1
from .types import Experience, FlatExperience

__all__ = [
    "REWARD_NAMES", "AdaptiveKLController", "Experience", "ExternalReward", "FixedKLController",
    "FlatExperience", "RewardSpec", "Rewards", "bleu", "chrf", "combine_advantages",
    "combine_rewards", "dense_behavior_reward", "exact_match", "group_advantages", "kl_estimate",
    "kl_k1", "kl_k2", "kl_k3", "load_external_reward", "normalize_answer", "policy_loss",
    "sequence_teacher_likelihood", "token_advantages", "token_f1",
]
