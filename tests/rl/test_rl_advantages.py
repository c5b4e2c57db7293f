"""Advantages against float64 loops written from the definitions."""
import math

import pytest
import torch

from rba_core.errors import ConfigError
from rba_core.rl import combine_advantages, group_advantages, token_advantages


def loop_group_advantages(rewards, kind, scale, eps):
    r = rewards.double().tolist()
    flat = [x for row in r for x in row]
    batch_mean = sum(flat) / len(flat)
    batch_std = math.sqrt(sum((x - batch_mean) ** 2 for x in flat) / (len(flat) - 1))
    out = []
    for row in r:
        g = len(row)
        mean = sum(row) / g
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (g - 1))
        values = []
        for i, x in enumerate(row):
            if kind == "grpo":
                a = x - mean
            else:
                a = x - sum(row[j] for j in range(g) if j != i) / (g - 1)
            if scale == "group":
                a /= std + eps
            elif scale == "batch":
                a /= batch_std + eps
            values.append(a)
        out.append(values)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_loop(kind, scale):
    rewards = torch.randn(3, 5)
    got = group_advantages(rewards, kind=kind, scale=scale, eps=1e-4)
    torch.testing.assert_close(got.double(), loop_group_advantages(rewards, kind, scale, 1e-4),
                               rtol=1e-5, atol=1e-6)


def test_default_scale_is_each_estimators_published_form():
    rewards = torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(group_advantages(rewards, "grpo"),
                               loop_group_advantages(rewards, "grpo", "group", 1e-4))
    torch.testing.assert_close(group_advantages(rewards, "rloo"),
                               loop_group_advantages(rewards, "rloo", "none", 1e-4))


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_exact_zero_and_no_nan(kind, scale):
    # 0.1 is not exact in binary: the group mean of three of them differs in the last bit.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 2.0, 4.0]])
    got = group_advantages(rewards, kind=kind, scale=scale, eps=0.0)
    assert torch.equal(got[0], torch.zeros(3))
    assert bool(torch.isfinite(got).all()) and bool((got[1] != 0).all())
    everything_equal = group_advantages(torch.full((2, 3), 0.1), kind=kind, scale=scale, eps=0.0)
    assert torch.equal(everything_equal, torch.zeros(2, 3))


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_single_sample_group_is_refused(kind):
    with pytest.raises(ConfigError, match="G >= 2"):
        group_advantages(torch.randn(4, 1), kind=kind)
    with pytest.raises(ConfigError, match="G >= 2"):
        token_advantages(torch.randn(4, 1, 3), torch.ones(4, 1, 3, dtype=torch.bool),
                         baseline="group")


def test_bad_settings_and_rewards():
    with pytest.raises(ConfigError, match="kind"):
        group_advantages(torch.randn(2, 3), kind="ppo")
    with pytest.raises(ConfigError, match="scale"):
        group_advantages(torch.randn(2, 3), scale="token")
    with pytest.raises(ConfigError, match="eps"):
        group_advantages(torch.randn(2, 3), eps=-1.0)
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ConfigError, match="gamma"):
        token_advantages(torch.randn(1, 2, 3), torch.ones(1, 2, 3, dtype=torch.bool), gamma=1.5)


def make_mask(batch, group, length):
    lengths = torch.randint(0, length + 1, (batch, group))
    mask = torch.arange(length) < lengths[..., None]
    mask[0, 0] = True
    mask[0, 0, 2] = False  # a hole inside a response (e.g. a token the policy did not write)
    return mask


def loop_reward_to_go(rewards, mask, gamma):
    batch, group, length = rewards.shape
    out = torch.zeros(batch, group, length, dtype=torch.float64)
    for b in range(batch):
        for g in range(group):
            running = 0.0
            for t in reversed(range(length)):
                if mask[b, g, t]:
                    running = float(rewards[b, g, t]) + gamma * running
                    out[b, g, t] = running
    return out


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_token_advantages_are_discounted_reward_to_go(gamma):
    rewards = torch.randn(2, 3, 6)
    mask = make_mask(2, 3, 6)
    got = token_advantages(rewards, mask, gamma=gamma)
    torch.testing.assert_close(got.double(), loop_reward_to_go(rewards, mask, gamma),
                               rtol=1e-5, atol=1e-6)


def test_token_group_baseline_is_group_mean_of_sample_means():
    rewards = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = make_mask(2, 4, 5)
    mask[1, 2] = False  # an empty sample is left out of its group's baseline
    togo = loop_reward_to_go(rewards, mask, 0.9)
    want = torch.zeros_like(togo)
    for b in range(2):
        means = [togo[b, g][mask[b, g]].mean().item() for g in range(4) if mask[b, g].any()]
        baseline = sum(means) / len(means)
        want[b] = torch.where(mask[b], togo[b] - baseline, torch.zeros(()))
    got = token_advantages(rewards, mask, gamma=0.9, baseline="group")
    torch.testing.assert_close(got, want)
    assert torch.equal(got[1, 2], torch.zeros(5))


def test_combine_advantages_broadcasts_and_zeroes_padding():
    mask = make_mask(2, 3, 4)
    seq = torch.randn(2, 3)
    tok = torch.randn(2, 3, 4) * mask
    got = combine_advantages(seq, tok, mask)
    torch.testing.assert_close(got, torch.where(mask, seq[..., None] + tok, torch.zeros(())))
    torch.testing.assert_close(combine_advantages(seq, None, mask),
                               torch.where(mask, seq[..., None], torch.zeros(())))
    torch.testing.assert_close(combine_advantages(None, tok, mask), tok)
    with pytest.raises(ConfigError):
        combine_advantages(None, None, mask)
    with pytest.raises(ValueError, match="sequence_advantages"):
        combine_advantages(torch.randn(3, 2), tok, mask)
