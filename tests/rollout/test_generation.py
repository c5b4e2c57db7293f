"""``rba_core.rollout.generate``, the one decode path (chat, `rba generate`, synthesis,
evaluation): greedy equals the plain-loop oracle, stop ids end a row and are kept, sampling is
seeded and its controls hold, bad settings are refused naming the setting."""
import pytest
import torch

from helpers import reference_generate, write_tiny_llm
from rba_core.errors import ConfigError
from rba_core.models.llama import LlamaForCausalLM
from rba_core.rollout import RolloutEngine, SamplingConfig, generate


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return LlamaForCausalLM.from_pretrained(write_tiny_llm(tmp_path_factory.mktemp("llm")))


def prompts_of(lengths, vocab):
    return [torch.randint(0, vocab, (n,)).tolist() for n in lengths]


def greedy(max_new_tokens, stop_ids=()):
    return SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens,
                          stop_ids=tuple(stop_ids))


def test_greedy_equals_the_plain_loop_for_ragged_prompts(model):
    prompts = prompts_of((3, 9, 6), model.config.vocab_size)
    assert generate(model, prompts, greedy(10)) == reference_generate(model, prompts,
                                                                      max_new_tokens=10)


def test_a_stop_id_ends_its_row_and_is_kept(model):
    prompts = prompts_of((5, 8), model.config.vocab_size)
    free = generate(model, prompts, greedy(10))
    stop = free[0][3]
    stopped = generate(model, prompts, greedy(10, stop_ids=[stop]))
    assert stopped[0] == free[0][: free[0].index(stop) + 1]
    assert stopped[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])


def test_sampling_is_seeded_and_its_controls_hold(model):
    prompts = prompts_of((4, 6), model.config.vocab_size)
    plain = generate(model, prompts, greedy(12))
    hot = SamplingConfig(temperature=5.0, max_new_tokens=12)
    first = generate(model, prompts, hot, seed=11)
    assert generate(model, prompts, hot, seed=11) == first
    assert generate(model, prompts, hot, seed=12) != first
    assert first != plain
    assert generate(model, prompts, SamplingConfig(temperature=5.0, max_new_tokens=12, top_k=1),
                    seed=3) == plain
    assert generate(model, prompts, SamplingConfig(temperature=5.0, max_new_tokens=12,
                                                   top_p=1e-6), seed=3) == plain
    top3 = generate(model, prompts, SamplingConfig(temperature=5.0, max_new_tokens=12, top_k=3),
                    seed=5)
    with torch.no_grad():
        for prompt, new in zip(prompts, top3):
            logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1:-1]
            allowed = logits.topk(3, dim=-1).indices
            assert all(token in allowed[i].tolist() for i, token in enumerate(new))


def test_a_kept_engine_gives_the_same_answers(model):
    prompts = prompts_of((4, 7), model.config.vocab_size)
    engine = RolloutEngine(model, max_new_tokens=16)
    once = generate(model, prompts, greedy(8), engine=engine)
    assert generate(model, prompts, greedy(8), engine=engine) == once
    assert generate(model, prompts, greedy(8)) == once


@pytest.mark.parametrize("field,value", [("top_p", 0.0), ("temperature", float("nan")),
                                         ("temperature", -1.0), ("top_k", -2),
                                         ("max_new_tokens", 0), ("min_p", 1.0)])
def test_bad_settings_are_refused_naming_the_setting(model, field, value):
    sampling = SamplingConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"sampling.{field}"):
        generate(model, [[1, 2]], sampling)
    with pytest.raises(ConfigError, match="--" + field.replace("_", "-")):
        sampling.validate(name=lambda f: "--" + f.replace("_", "-"))
