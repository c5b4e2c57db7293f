"""Rollout and scoring engine with shared-prefix KV caches (a standalone backend).

    from rba_core.rollout import RolloutEngine, SamplingConfig

    engine = RolloutEngine(model, max_prompt_len=1024, max_new_tokens=256)
    batch = engine.generate(prompts, group_size=8, sampling=SamplingConfig(temperature=0.8),
                            seeds=[11, 12])
    teacher = RolloutEngine(teacher_model).score(teacher_prompts, batch.tokens, batch.lengths)
    train = shared_prefix_logprobs(policy, speech_prompts, batch.tokens, batch.lengths)

Prompts are token ids ``[P]`` or input embeddings ``[P, hidden]``; it knows nothing of RL.
``generate(model, prompts, sampling)`` is the one-continuation-per-prompt call (group size 1)
that chat, ``rba generate``, synthesis and evaluation use: rba has one decode path.
"""
from rba_core.rollout.cache import SharedPrefixKVCache, unshared_kv_bytes
from rba_core.rollout.engine import (
    RolloutBatch,
    RolloutEngine,
    ScoreBatch,
    generate,
    shared_prefix_hidden,
    shared_prefix_logprobs,
)
from rba_core.rollout.sampling import SamplingConfig, filter_logits, sample_tokens

__all__ = [
    "RolloutBatch",
    "RolloutEngine",
    "SamplingConfig",
    "ScoreBatch",
    "SharedPrefixKVCache",
    "filter_logits",
    "generate",
    "sample_tokens",
    "shared_prefix_hidden",
    "shared_prefix_logprobs",
    "unshared_kv_bytes",
]
