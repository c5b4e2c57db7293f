"""The docs' "RBA from your own training loop" snippet, run on a tiny random LLM: the rollout
engine samples, a teacher scores, rba_core.rl turns that into a loss whose gradient moves the
policy towards the teacher (the dense reward's reverse KL falls)."""
import copy

import torch

from helpers import write_tiny_llm
from rba_core.models.llama import LlamaForCausalLM
from rba_core.rl import Experience, RewardSpec, combine_advantages, combine_rewards, policy_loss
from rba_core.rl import token_advantages
from rba_core.rollout import RolloutEngine, SamplingConfig, shared_prefix_hidden


def test_on_policy_distillation_from_a_plain_loop(tmp_path):
    policy = LlamaForCausalLM.from_pretrained(write_tiny_llm(tmp_path / "student", seed=1))
    teacher = LlamaForCausalLM.from_pretrained(write_tiny_llm(tmp_path / "teacher", seed=2))
    teacher.requires_grad_(False)
    prompts = [torch.tensor([1, 5, 9, 4]), torch.tensor([1, 7, 3])]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=6)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    engine, teacher_engine = RolloutEngine(policy), RolloutEngine(teacher)
    reverse_kl = []
    for step in range(8):
        batch = engine.generate(prompts, 4, sampling, seeds=[step, 100 + step])
        scores = teacher_engine.score(prompts, batch.tokens, batch.lengths)
        exp = Experience(tokens=batch.tokens, mask=batch.mask, old_logprobs=batch.logprobs,
                         teacher_logprobs=scores.logprobs, lengths=batch.lengths)
        rewards = combine_rewards([RewardSpec("dense")], exp)
        exp.advantages = combine_advantages(None, token_advantages(rewards.token, exp.mask),
                                            exp.mask)
        reverse_kl.append(float(-(rewards.token * exp.mask).sum() / exp.mask.sum()))

        hidden = shared_prefix_hidden(policy, prompts, batch.tokens, batch.lengths)
        B, G, T, D = hidden.shape
        flat = exp.flatten()
        loss, metrics = policy_loss(hidden.reshape(B * G, T, D), policy.lm_head_weight,
                                    flat.tokens, flat.mask, flat.advantages, flat.old_logprobs,
                                    beta=0.0, eps_low=0.2, eps_high=0.28, loss_type="dapo")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        # The rollout's log-probs are the policy's own: before the step the ratio is 1.
        assert abs(float(metrics["ratio_mean"]) - 1.0) < 1e-4
    assert sum(reverse_kl[-3:]) / 3 < sum(reverse_kl[:3]) / 3
