"""RBA's RL step on tiny random models: the loss and its gradients through the shared-prefix
path against an unshared float64 recomputation, learning from a reward that prefers one word,
the update units, the reference and KL state, and bad configs."""
import copy
import math

import pytest
import torch

from helpers import tiny_speechlm, write_dataset, write_tiny_llm
from rba_core.data.speech import SpeechDataset
from rba_core.errors import ConfigError
from rba_core.tasks.rba import (
    RBAConfig,
    ReferenceWeights,
    RLStep,
    RewardWeights,
    SpeechRLTask,
    TextPrompts,
    TextRLTask,
    build_rl_step,
)


def paris_reward(rows, responses, group):
    """An external reward that prefers answers saying "paris" (a module:function target)."""
    return [float(text.split().count("paris")) for text in responses]


@pytest.fixture()
def speech(tmp_path):
    torch.manual_seed(0)
    slm = tiny_speechlm(tmp_path / "llm")
    write_dataset(tmp_path / "data")
    dataset = SpeechDataset(tmp_path / "data", "train", slm.tokenizer, n_mels=slm.n_mels)
    return slm, dataset


def _unshared_loss(slm, prompts, experience, config, indices):
    """The same objective, each prompt + response run alone through the plain forward and
    scored over full float64 logits (no shared prefix, no fused kernel)."""
    B, G, T = experience.tokens.shape
    total, count, per_seq = 0.0, 0, []
    rows = prompts.policy(indices)
    for i, b in enumerate(indices):
        for g in range(G):
            n = int(experience.lengths[b, g])
            ids = experience.tokens[b, g, :n]
            embeds = torch.cat([rows[i], slm.llm.embed(ids)]).double()[None]
            hidden = slm.llm(inputs_embeds=embeds, return_hidden=True)[0]
            P = rows[i].shape[0]
            logits = hidden[P - 1: P - 1 + n] @ slm.llm.lm_head_weight.double().T
            logp = (logits / config.temperature).log_softmax(-1).gather(-1, ids[:, None])[:, 0]
            ratio = torch.exp(logp - experience.old_logprobs[b, g, :n].double())
            adv = experience.advantages[b, g, :n].double()
            clipped = ratio.clamp(1 - config.eps_low, 1 + config.eps_high)
            token_loss = -torch.minimum(ratio * adv, clipped * adv)
            if config.beta > 0:
                d = experience.ref_logprobs[b, g, :n].double() - logp
                token_loss = token_loss + config.beta * (torch.exp(d) - d - 1)
            total = total + token_loss.sum()
            count += n
            per_seq.append(token_loss.mean())
    if config.loss_type == "dapo":
        return total / count
    return torch.stack(per_seq).mean()


@pytest.mark.parametrize("loss_type,beta", [("dapo", 0.0), ("grpo", 0.1)])
def test_loss_and_gradients_equal_an_unshared_float64_recomputation(speech, loss_type, beta):
    slm, dataset = speech
    config = RBAConfig(group_size=3, max_new_tokens=5, loss_type=loss_type, beta=beta,
                       rewards=RewardWeights(dense=1.0, chrf=0.5))
    step = build_rl_step(slm, config)
    task = SpeechRLTask(slm, dataset, step, batch_size=3)
    prompts = task.prompts(dataset.batch([0, 1, 2]))
    experience, _ = step.rollout(prompts, seeds=[1, 2, 3])
    # Move the policy off the rollout's weights so ratios (and the clip) are exercised.
    with torch.no_grad():
        for p in slm.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))

    loss, _ = step.loss(prompts, experience, [0, 2])
    grads = torch.autograd.grad(loss, slm.trainable_parameters())

    from rba_core.models.speechlm import SpeechLM

    reference = SpeechLM(copy.deepcopy(slm.encoder), copy.deepcopy(slm.adapter),
                         copy.deepcopy(slm.llm), slm.tokenizer).double()
    ref_prompts = task.prompts(dataset.batch([0, 1, 2]))
    ref_prompts.speechlm = reference
    expected = _unshared_loss(reference, ref_prompts, experience, config, [0, 2])
    expected_grads = torch.autograd.grad(expected, reference.trainable_parameters())
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-6)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got.double(), want, rtol=1e-3, atol=1e-5)


def test_a_reward_that_prefers_a_word_raises_its_probability(tmp_path):
    from rba_core.data.tokenizer import Tokenizer
    from rba_core.models.llama import LlamaForCausalLM
    from rba_core.train.config import TrainerConfig, build_config
    from rba_core.train.trainer import Trainer

    folder = write_tiny_llm(tmp_path / "llm")
    policy = LlamaForCausalLM.from_pretrained(folder)
    teacher = copy.deepcopy(policy).requires_grad_(False)
    tokenizer = Tokenizer.from_pretrained(folder)
    config = RBAConfig(group_size=4, max_new_tokens=4, temperature=1.0, beta=0.0,
                       rewards=RewardWeights(dense=0.0, external=1.0),
                       external_reward=f"{__name__}:paris_reward")
    step = RLStep(policy, teacher, config, stop_ids=tokenizer.stop_ids,
                  decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    rows = [{"instruction": "what is the capital of france ?", "id": str(i)} for i in range(4)]
    task = TextRLTask(step, tokenizer, rows, batch_size=2,
                      trainable=list(policy.parameters()))
    paris = tokenizer.encode("paris")[0]
    prompt = task.prompts(rows[:1]).ids[0]

    def paris_probability() -> float:
        with torch.no_grad():
            logits = policy(prompt[None])[0, -1]
        return float(logits.softmax(-1)[paris])

    assert step.release_packed  # a full fine-tune: the packed decode copy goes after a rollout
    before = paris_probability()
    trainer_config = build_config(TrainerConfig, {}, [
        f"run.output_dir={tmp_path / 'out'}", "run.max_steps=12", "run.progress=false",
        "run.plot=false", "run.device=cpu", "optim.lr=3e-2", "schedule.warmup_steps=0"])
    Trainer(trainer_config, task).train()
    assert paris_probability() > before + 0.05


def constant_reward(rows, responses, group):
    return [0.5] * len(responses)


def test_equal_rewards_give_zero_advantages_and_a_finite_loss(speech):
    slm, dataset = speech
    config = RBAConfig(group_size=3, max_new_tokens=4, rewards=RewardWeights(
        dense=0.0, external=1.0), external_reward=f"{__name__}:constant_reward")
    step = build_rl_step(slm, config)
    task = SpeechRLTask(slm, dataset, step, batch_size=2)
    prompts = task.prompts(dataset.batch([0, 1]))
    experience, stats = step.rollout(prompts, seeds=[5, 6])
    assert torch.equal(experience.advantages, torch.zeros_like(experience.advantages))
    loss, metrics = step.loss(prompts, experience)
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    assert stats.metrics["reward_external:" + config.external_reward] == 0.5
    # No reward reads the teacher, so it never scored; the frozen LLM keeps its packed copy.
    assert experience.teacher_logprobs is None and "teacher_reverse_kl" not in stats.metrics
    assert not step.release_packed and step.policy_engine._packed is not None
    assert stats.metrics["stopped_share"] + stats.metrics["truncated_share"] == 1.0


def test_update_units_roll_out_once_per_batch_and_resume_inside_it(speech):
    slm, dataset = speech
    config = RBAConfig(group_size=2, max_new_tokens=3, inner_epochs=2, minibatches=2)
    task = SpeechRLTask(slm, dataset, build_rl_step(slm, config), batch_size=2)
    calls = []
    real = task.step.rollout

    def counting(prompts, seeds):
        calls.append(list(seeds))
        return real(prompts, seeds)

    task.step.rollout = counting
    units = task.train_batches(epoch=0, rank=0, world_size=1, seed=7)
    assert len(units) == len(units.prompt_batches) * 4
    drawn = list(units)
    assert len(calls) == len(units.prompt_batches)
    assert [u.indices for u in drawn[:4]] == [[0], [1], [0], [1]]
    assert all(u.experience is drawn[0].experience for u in drawn[:4])
    assert drawn[0].stats is not None and all(u.stats is None for u in drawn[1:4])
    # Resuming at unit 2 reuses the experience the task kept, without sampling again.
    task.remember((0, 0), drawn[0].experience)
    state = task.state_dict()
    fresh = SpeechRLTask(slm, dataset, build_rl_step(slm, config), batch_size=2)
    fresh.load_state_dict(state)
    fresh.step.rollout = counting
    before = len(calls)
    resumed = next(iter(fresh.train_batches(0, 0, 1, 7).iter_from(2)))
    assert len(calls) == before
    assert torch.equal(resumed.experience.tokens, drawn[0].experience.tokens)
    # The same seed gives the same samples: seeds derive from (seed, epoch, row id).
    again = SpeechRLTask(slm, dataset, build_rl_step(slm, config), batch_size=2)
    again.step.rollout = counting
    next(iter(again.train_batches(0, 0, 1, 7)))
    assert calls[-1] == calls[0]


def test_reference_weights_swap_in_and_back(speech):
    slm, _ = speech
    params = slm.trainable_parameters()
    reference = ReferenceWeights(params)
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    moved = [p.detach().clone() for p in params]
    with reference.active():
        assert all(torch.equal(p, s) for p, s in zip(params, start))
    assert all(torch.equal(p, m) for p, m in zip(params, moved))
    other = ReferenceWeights(params)
    other.load_state_dict(reference.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.saved, start))


def test_the_adaptive_kl_controller_moves_beta_and_is_checkpointed(speech):
    slm, dataset = speech
    config = RBAConfig(group_size=2, max_new_tokens=3, beta=0.1, target_kl=0.01, kl_horizon=10)
    step = build_rl_step(slm, config)
    step.after_update(1.0)  # far above target: beta grows
    assert step.kl.beta > 0.1
    fresh = build_rl_step(slm, config)
    fresh.load_state_dict(step.state_dict())
    assert fresh.kl.beta == step.kl.beta


@pytest.mark.parametrize("overrides,key", [
    ({"group_size": 1, "rewards": RewardWeights(dense=1.0, chrf=1.0)}, "rba.group_size"),
    ({"group_size": 1, "token_baseline": "group"}, "rba.group_size"),
    ({"eps_low": 1.5}, "rba.eps_low"),
    ({"eps_high": -0.1}, "rba.eps_high"),
    ({"temperature": 0.0}, "rba.temperature"),
    ({"loss_type": "ppo"}, "rba.loss_type"),
    ({"advantage": "vtrace"}, "rba.advantage"),
    ({"kl_estimator": "k4"}, "rba.kl_estimator"),
    ({"target_kl": 0.1, "beta": 0.0}, "rba.beta"),
    ({"rewards": RewardWeights(dense=0.0)}, "rba.rewards"),
    ({"rewards": RewardWeights(external=1.0)}, "rba.external_reward"),
    ({"rewards": RewardWeights(external=1.0), "external_reward": "no_such_module:f"},
     "no_such_module"),
    ({"rewards": RewardWeights(external=1.0), "external_reward": f"{__name__}:missing"},
     "missing"),
])
def test_bad_configs_are_rejected_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RBAConfig(**overrides).validate()


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    from rba_core.models.llama import LlamaForCausalLM

    policy = LlamaForCausalLM.from_pretrained(write_tiny_llm(tmp_path / "a"))
    other = LlamaForCausalLM.from_pretrained(write_tiny_llm(tmp_path / "b", padded_rows=7))
    with pytest.raises(ConfigError, match="share one tokenizer"):
        RLStep(policy, other, RBAConfig(), stop_ids=[1], decode=str)


def test_text_prompts_feed_ids_to_the_policy():
    ids = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    prompts = TextPrompts(ids=ids, teacher=ids, rows=[{}, {}])
    assert prompts.policy([1]) == [ids[1]]


RBA_SETTINGS = ["task=rba", "rba.group_size=2", "rba.max_new_tokens=4", "rba.beta=0.05",
                "rba.target_kl=0.01", "rba.inner_epochs=3", "rba.temperature=0.9",
                "run.checkpoint_every=2", "schedule.warmup_steps=1", "optim.lr=1e-2",
                "model.lora_rank=2"]


def test_killed_and_resumed_equals_an_uninterrupted_run(tiny_models, tmp_path):
    """Checkpoint at step 2 falls inside the first rollout's three inner epochs, so the
    resume must reuse the checkpointed experience, reference weights and KL controller."""
    from helpers import adapter_weights, killed_then_resumed, speech_config, uninterrupted_run
    from rba_core.train.metrics import read_metrics

    settings = [*RBA_SETTINGS, "run.max_steps=5"]
    whole, start, result = uninterrupted_run(speech_config(tiny_models, tmp_path / "whole",
                                                           *settings))
    assert result.step == 5 and result.skipped_steps == 0
    records = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    assert {"rollout_s", "scoring_s", "update_s", "reward_dense", "teacher_reverse_kl",
            "clip_fraction", "ratio_max", "ref_kl_mean", "entropy_mean", "grad_norm",
            "stopped_share", "looping_share", "beta"} <= set(records[0])

    resumed = killed_then_resumed(speech_config(tiny_models, tmp_path / "killed", *settings),
                                  die_on_call=4)
    for got, want, initial in zip(adapter_weights(resumed), adapter_weights(whole), start):
        assert torch.equal(got, want)
        assert not torch.equal(got, initial)
    assert resumed.step.kl.beta == whole.step.kl.beta != 0.05


def test_rba_train_command_runs_the_packaged_config(tiny_models, tmp_path, capsys):
    from helpers import CONFIG_DIR, rba_train

    out = tmp_path / "run"
    code = rba_train(["--config", str(CONFIG_DIR / "rba.yaml"),
                      f"model.encoder={tiny_models['encoder']}",
                      f"model.llm={tiny_models['llm']}", "model.adapter=null",
                      f"data.dir={tiny_models['data']}", "data.batch_size=2",
                      "rba.group_size=2", "rba.max_new_tokens=3", "run.max_steps=2",
                      f"run.output_dir={out}", "run.device=cpu", "run.progress=false",
                      "run.plot=false"])
    assert code == 0
    assert (out / "adapter" / "adapter.safetensors").is_file()
    assert "rba" in capsys.readouterr().out


@pytest.mark.slow
def test_a_few_rba_steps_on_the_real_default_models(tmp_path):
    """The packaged adapter, SmolLM2-135M and Whisper tiny.en, four espeak clips: two RL steps
    run, report their metrics, and move the adapter."""
    import json
    import shutil
    import subprocess

    import soundfile

    from helpers import REPO
    from rba_core.tasks import build_task, build_task_config
    from rba_core.train import Trainer
    from rba_core.train.metrics import read_metrics
    from rba_core.weights.prepare import default_model_dir

    for name in ("whisper-tiny.en", "smollm2-135m-instruct"):
        assert (default_model_dir(name) / "config.json").is_file(), \
            f"{name} is not prepared: run `rba prepare`"
    assert shutil.which("espeak-ng"), "espeak-ng is missing: run `make install`"
    data = tmp_path / "data"
    (data / "audio").mkdir(parents=True)
    questions = ["What is the capital of France?", "Name a large animal.",
                 "How many days are in a week?", "What color is the sky?"]
    lines = []
    for i, question in enumerate(questions):
        wav = f"audio/{i:05d}.wav"
        subprocess.run(["espeak-ng", "-w", str(data / wav), question], check=True,
                       capture_output=True)
        info = soundfile.info(str(data / wav))
        lines.append(json.dumps({"id": f"q{i}", "task": "qa", "audio": wav, "instruction":
                                 question, "prompt": "", "response": "", "split": "train",
                                 "duration": info.duration, "sample_rate": info.samplerate}))
    (data / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    config = build_task_config({}, [
        "task=rba", f"model.adapter={REPO / 'rba_core' / 'assets' / 'speechlm-default'}",
        f"data.dir={data}", "data.batch_size=2", "rba.group_size=2", "rba.max_new_tokens=12",
        "run.max_steps=2", f"run.output_dir={tmp_path / 'run'}", "run.device=cpu",
        "run.progress=false", "run.plot=false", "optim.lr=1e-3", "schedule.warmup_steps=0"])
    torch.set_num_threads(1)
    task = build_task(config, torch.device("cpu"))
    start = [p.detach().clone() for p in task.trainable_parameters()]
    result = Trainer(config, task).train()
    assert result.step == 2 and result.skipped_steps == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 2
    assert all(math.isfinite(r["loss"]) and r["response_length"] > 0 for r in records)
    assert any(not torch.equal(p.detach(), s) for p, s in zip(task.trainable_parameters(), start))


def test_held_out_answers_are_scored_every_n_steps(speech):
    slm, dataset = speech
    config = RBAConfig(group_size=2, max_new_tokens=3, eval_every=2, eval_rows=2)
    task = SpeechRLTask(slm, dataset, build_rl_step(slm, config), batch_size=2,
                        heldout=dataset)
    assert task.on_step_end(1, {"skipped": 0}) is None
    scores = task.on_step_end(2, {"skipped": 0})
    assert scores["eval_rows"] == 2.0
    assert {"eval_teacher_logprob", "eval_chrf"} <= set(scores)


def test_an_undecodable_clip_is_reported_as_skipped(tmp_path):
    torch.manual_seed(0)
    slm = tiny_speechlm(tmp_path / "llm")
    data = write_dataset(tmp_path / "data")
    (data / "audio" / "00001.flac").write_text("not audio")
    dataset = SpeechDataset(data, "train", slm.tokenizer, n_mels=slm.n_mels)
    task = SpeechRLTask(slm, dataset, build_rl_step(slm, RBAConfig(group_size=2,
                                                                   max_new_tokens=3)),
                        batch_size=3)
    units = list(task.train_batches(0, 0, 1, seed=1))
    assert units and len(units[0].prompts.rows) == 2
    assert [reason for _, reason in task.skipped_samples()] == ["unreadable_audio"]
