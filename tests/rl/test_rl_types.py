"""Experience: flattening to rows and selecting minibatches keeps every field aligned."""
import pytest
import torch

from rba_core.errors import ConfigError
from rba_core.rl import Experience

B, G, T = 3, 2, 4


def make_experience():
    mask = torch.rand(B, G, T) > 0.3
    return Experience(
        tokens=torch.randint(0, 99, (B, G, T)), mask=mask, old_logprobs=torch.randn(B, G, T),
        ref_logprobs=torch.randn(B, G, T), sequence_rewards=torch.randn(B, G),
        advantages=torch.randn(B, G, T),
        finish_reasons=[["stop", "length"], ["stop", "stop"], ["length", "stop"]],
        metadata=[{"id": f"p{b}"} for b in range(B)])


def test_flatten_puts_sample_g_of_prompt_b_at_row_b_times_g_plus_g():
    exp = make_experience()
    flat = exp.flatten()
    assert flat.num_rows == B * G
    for b in range(B):
        for g in range(G):
            row = b * G + g
            assert torch.equal(flat.tokens[row], exp.tokens[b, g])
            assert torch.equal(flat.advantages[row], exp.advantages[b, g])
            assert flat.sequence_rewards[row] == exp.sequence_rewards[b, g]
            assert flat.lengths[row] == exp.mask[b, g].sum()
            assert flat.group_index[row] == b
            assert flat.metadata[row]["id"] == f"p{b}"
            assert flat.finish_reasons[row] == exp.finish_reasons[b][g]
    assert flat.teacher_logprobs is None


def test_select_and_minibatches_keep_rows_aligned():
    flat = make_experience().flatten()
    picked = flat.select([4, 1])
    assert torch.equal(picked.tokens, flat.tokens[[4, 1]])
    assert torch.equal(picked.old_logprobs, flat.old_logprobs[[4, 1]])
    assert picked.metadata == [flat.metadata[4], flat.metadata[1]]
    assert picked.finish_reasons == [flat.finish_reasons[4], flat.finish_reasons[1]]
    assert picked.group_index.tolist() == [2, 0]
    assert torch.equal(flat.select(slice(2, 4)).mask, flat.mask[2:4])

    batches = list(flat.minibatches(4, generator=torch.Generator().manual_seed(0)))
    assert [b.num_rows for b in batches] == [4, 2]
    seen = torch.cat([b.group_index * 10 + b.tokens[:, 0] for b in batches])
    whole = flat.group_index * 10 + flat.tokens[:, 0]
    assert sorted(seen.tolist()) == sorted(whole.tolist())
    again = list(flat.minibatches(4, generator=torch.Generator().manual_seed(0)))
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(batches, again))
    with pytest.raises(ConfigError, match="minibatch size"):
        next(flat.minibatches(0))


def test_shape_and_dtype_mistakes_name_the_field():
    exp = make_experience()
    with pytest.raises(ValueError, match="advantages must be a tensor of shape"):
        Experience(exp.tokens, exp.mask, exp.old_logprobs, advantages=torch.zeros(B, G))
    with pytest.raises(ValueError, match="mask must be a bool"):
        Experience(exp.tokens, exp.mask.int(), exp.old_logprobs)
    with pytest.raises(ValueError, match=r"\[B, G, T\]"):
        Experience(exp.tokens[0], exp.mask[0], exp.old_logprobs[0])
    with pytest.raises(ValueError, match="metadata"):
        Experience(exp.tokens, exp.mask, exp.old_logprobs, metadata=[{}])
    with pytest.raises(ValueError, match="finish_reasons"):
        Experience(exp.tokens, exp.mask, exp.old_logprobs, finish_reasons=[["stop"]] * B)
