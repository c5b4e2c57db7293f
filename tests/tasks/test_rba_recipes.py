"""The packaged RBA recipes (spoken QA, speech-to-text translation) and the teacher they may
name: each config loads with the reward mix it documents and trains a few steps on tiny random
models; the task rewards are the very metrics `rba eval` reports; a teacher whose tokenizer
differs from the SpeechLM's is refused before any model loads, naming the key and the fixes."""
from __future__ import annotations

import pytest
import torch
import yaml

from helpers import CONFIG_DIR, REPO, WORDS, speech_config, tiny_speechlm, write_dataset, \
    write_tiny_llm
from rba_core.data.speech import SpeechDataset
from rba_core.errors import ConfigError
from rba_core.tasks import build_task, load_task_config
from rba_core.tasks.rba import RBAConfig, RLStep, SpeechRLTask, build_rl_step
from rba_core.train import config_to_dict

RECIPES = {
    # name: (the rewards it switches on, the synth command its comments name)
    "qa": ({"dense", "exact_match", "token_f1"}, "rba synth --task qa"),
    "s2tt": ({"dense", "chrf"}, "rba synth --task translate --target-language French"),
}
TINY_RL = ["rba.group_size=2", "rba.max_new_tokens=3", "data.batch_size=2"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_loads_with_the_rewards_it_documents(name, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the warm-start adapter is a path relative to the repo root
    path = CONFIG_DIR / f"{name}.yaml"
    config = load_task_config(path)
    rewards, command = RECIPES[name]
    weights = config_to_dict(config)["rba"]["rewards"]
    assert {key for key, weight in weights.items() if weight} == rewards
    assert config.task == "rba" and config.rba.group_size >= 2
    assert config.rba.reference_key == "response"
    assert config.model.adapter == "rba_core/assets/speechlm-default"
    assert config.model.teacher is None
    text = path.read_text()
    assert command in text and f"rba train --config rba_core/tasks/configs/{name}.yaml" in text
    written = tmp_path / f"{name}.yaml"
    written.write_text(yaml.safe_dump(config_to_dict(config)))
    assert load_task_config(written) == config


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_trains_a_few_steps_with_its_rewards(name, tiny_models, tmp_path):
    from helpers import rba_train
    from rba_core.train.metrics import read_metrics

    out = tmp_path / "run"
    code = rba_train(["--config", str(CONFIG_DIR / f"{name}.yaml"),
                      f"model.encoder={tiny_models['encoder']}",
                      f"model.llm={tiny_models['llm']}", "model.adapter=null",
                      f"data.dir={tiny_models['data']}", *TINY_RL, "run.max_steps=2",
                      f"run.output_dir={out}", "run.device=cpu", "run.progress=false",
                      "run.plot=false"])
    assert code == 0
    assert (out / "adapter" / "adapter.safetensors").is_file()
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 2
    components = {key[len("reward_"):] for key in records[0] if key.startswith("reward_")}
    assert components == RECIPES[name][0]
    assert "teacher_reverse_kl" in records[0]  # the dense reward read the teacher


def _rollout_texts(step, prompts, experience):
    decode = step.decode
    return [[decode(experience.tokens[b, g, :int(experience.lengths[b, g])].tolist())
             for g in range(experience.tokens.shape[1])] for b in range(len(prompts.rows))]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_the_recipe_rewards_are_the_scores_rba_eval_reports(name, tmp_path):
    """One implementation: each sample's sequence reward is the recipe's weighted sum of the
    functions `rba eval` scores with (spoken NQ's exact match / F1, the synth suite's chrF),
    called on the decoded sample and the row's reference."""
    from rba_core.eval import answers, nq
    from rba_core.rl import rewards as rewards_module

    assert answers.chrf is rewards_module._TEXT_METRICS["chrf"]
    assert nq.exact_match is rewards_module._TEXT_METRICS["exact_match"]
    assert nq.token_f1 is rewards_module._TEXT_METRICS["token_f1"]

    torch.manual_seed(0)
    slm = tiny_speechlm(tmp_path / "llm")
    # References made of the tiny vocabulary, so that F1 and chrF have words to match.
    rows = [{"instruction": "what is the capital of france ?", "prompt": "answer briefly .",
             "response": " ".join(WORDS[:10])},
            {"instruction": "say hello world", "prompt": "translate the audio into french .",
             "response": " ".join(WORDS[8:20])}]
    dataset = SpeechDataset(write_dataset(tmp_path / "data", rows), "train", slm.tokenizer,
                            n_mels=slm.n_mels)
    config = load_task_config(CONFIG_DIR / f"{name}.yaml", [
        "model.adapter=null", "rba.group_size=4", "rba.max_new_tokens=6"]).rba
    step = build_rl_step(slm, config)
    task = SpeechRLTask(slm, dataset, step, batch_size=2)
    w = config.rewards

    def expected(text: str, reference: str) -> float:
        if name == "qa":
            score = nq.score(text, [reference])
            return w.exact_match * score["exact_match"] + w.token_f1 * score["f1"]
        return w.chrf * answers.chrf(text, reference)

    def expected_rewards(texts, rows) -> torch.Tensor:
        return torch.tensor([[expected(t, row["response"]) for t in group]
                             for group, row in zip(texts, rows)])

    prompts = task.prompts(dataset.batch([0, 1]))
    experience, stats = step.rollout(prompts, seeds=[3, 4])
    texts = _rollout_texts(step, prompts, experience)
    first = experience.sequence_rewards
    assert torch.allclose(first, expected_rewards(texts, prompts.rows), atol=1e-6)
    assert float(first.max()) > 0  # partial matches: the comparison above is not 0 == 0
    # The same seeds give the same samples: make sample 0 of each group its own reference,
    # so that exact match fires and chrF is 1 for it.
    for b, row in enumerate(prompts.rows):
        row["response"] = texts[b][0]
    again, stats = step.rollout(prompts, seeds=[3, 4])
    assert _rollout_texts(step, prompts, again) == texts
    got = again.sequence_rewards
    assert torch.allclose(got, expected_rewards(texts, prompts.rows), atol=1e-6)
    assert float(got[:, 0].min()) == pytest.approx(w.exact_match + w.token_f1 if name == "qa"
                                                   else w.chrf)
    assert float(got[:, 1:].min()) < float(got[:, 0].min())  # the others score below it
    if name == "qa":
        assert stats.metrics["reward_exact_match"] == pytest.approx(float(torch.tensor(
            [[nq.score(t, [row["response"]])["exact_match"] for t in group]
             for group, row in zip(texts, prompts.rows)]).mean()))


# --------------------------------------------------------------- a teacher of another tokenizer
@pytest.fixture()
def other_tokenizer_teacher(tiny_models, tmp_path):
    """A tiny LLM with the same tokens and vocabulary size as the SpeechLM's, in another order:
    every id means another word. Only a comparison of the vocabularies can tell."""
    from rba_core.data.tokenizer import Tokenizer

    folder = write_tiny_llm(tmp_path / "teacher", tuple(reversed(WORDS)), seed=1)
    ours, theirs = Tokenizer.from_pretrained(tiny_models["llm"]), Tokenizer.from_pretrained(folder)
    assert ours.vocab_size == theirs.vocab_size and set(ours.get_vocab()) == set(theirs.get_vocab())
    assert not ours.same_vocabulary(theirs)
    return folder


def _no_model_loads(monkeypatch):
    import rba_core.tasks.rba as rba_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the teacher's tokenizer was checked")

    monkeypatch.setattr(rba_module, "load_speechlm", refuse)


def test_a_teacher_with_another_tokenizer_is_refused_before_any_model_loads(
        tiny_models, other_tokenizer_teacher, tmp_path, monkeypatch):
    config = speech_config(tiny_models, tmp_path / "run", "task=rba", "run.max_steps=1",
                           f"model.teacher={other_tokenizer_teacher}")
    _no_model_loads(monkeypatch)
    with pytest.raises(ConfigError) as error:
        build_task(config, torch.device("cpu"))
    message = str(error.value)
    assert message.startswith("model.teacher: ")
    for fix in ("with rba.rewards.dense on, the teacher scores the policy's token ids",
                "policy LLM's tokenizer", "leave model.teacher unset", "rba.rewards.dense=0",
                "rba.rewards.chrf=1.0", "rba synth --teacher DIR"):
        assert fix in message, fix


def test_with_only_text_rewards_another_tokenizers_teacher_is_refused_as_unneeded(
        tiny_models, other_tokenizer_teacher, tmp_path, monkeypatch):
    config = speech_config(tiny_models, tmp_path / "run", "task=rba", "run.max_steps=1",
                           "rba.rewards.dense=0", "rba.rewards.chrf=1",
                           f"model.teacher={other_tokenizer_teacher}")
    _no_model_loads(monkeypatch)
    with pytest.raises(ConfigError, match=r"^model\.teacher: .*no reward on reads the teacher"
                                          r".*leave model\.teacher unset") as error:
        build_task(config, torch.device("cpu"))
    assert "rba.rewards.dense=0" not in str(error.value)  # already off: not offered as a fix


def test_a_teacher_with_the_same_tokenizer_is_used(tiny_models, tmp_path):
    teacher = write_tiny_llm(tmp_path / "teacher", seed=1)  # other weights, same tokenizer
    config = speech_config(tiny_models, tmp_path / "run", "task=rba", "run.max_steps=1",
                           f"model.teacher={teacher}")
    task = build_task(config, torch.device("cpu"))
    assert task.step.teacher is not task.speechlm.llm
    assert not torch.equal(task.step.teacher.lm_head_weight, task.speechlm.llm.lm_head_weight)


def test_the_rl_step_compares_the_tokenizers_not_only_the_vocabulary_size(
        tiny_models, other_tokenizer_teacher):
    from rba_core.data.tokenizer import Tokenizer
    from rba_core.models.llama import LlamaForCausalLM

    policy = LlamaForCausalLM.from_pretrained(tiny_models["llm"])
    teacher = LlamaForCausalLM.from_pretrained(other_tokenizer_teacher)
    tokenizer = Tokenizer.from_pretrained(tiny_models["llm"])
    # The heads alone agree, so without the tokenizers the step cannot tell.
    RLStep(policy, teacher, RBAConfig(), stop_ids=[1], decode=str)
    with pytest.raises(ConfigError, match=r"^model\.teacher: the teacher's tokenizer .* does "
                                          r"not map tokens to the same ids"):
        RLStep(policy, teacher, RBAConfig(), stop_ids=[1], decode=str, tokenizer=tokenizer,
               teacher_tokenizer=Tokenizer.from_pretrained(other_tokenizer_teacher))
