"""rba's fused losses inside TRL's trainers (rba_core.integrations.trl) against TRL's own.

On a tiny random Llama (hidden 32, 2 layers, vocabulary 100) in float32: the rba-backed trainer's
loss, gradients and logged metrics equal TRL's own on one prepared batch (the inputs dict TRL's
compute_loss receives, so no generation runs) within 1e-5 relative; a two-step training run
with each leaves the same weights; and every option the kernels cannot honour is refused by
name when the trainer is built.
"""
import math
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DistillationConfig, DistillationTrainer, GRPOConfig, GRPOTrainer

from helpers import relative_error, write_tiny_llm
from rba_core.integrations.trl import (
    RbaDistillationTrainer, RbaGRPOTrainer, UnsupportedOption,
)

VOCAB = 100
B, P, C = 4, 5, 6      # completions, prompt width, completion width
TOL = 1e-5
# AdamW scales each gradient element by its own running magnitude, so an element whose gradient
# is near zero turns float32 rounding into a full-size update: after two steps at lr 1e-2 (the
# weights move by ~12%) the runs agree to ~5e-5 of the largest weight at 1 thread; at 2 threads
# (another reduction order) a GKD run was measured at 1.6e-4.
WEIGHT_TOL = 3e-4
PROMPT = "what is the capital of france"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl")
    student = write_tiny_llm(root / "student", padded_rows=VOCAB - 38)
    teacher = write_tiny_llm(root / "teacher", seed=1, padded_rows=VOCAB - 38)
    return student, teacher


@pytest.fixture(scope="module")
def tokenizer(folders):
    tokenizer = AutoTokenizer.from_pretrained(folders[0], padding_side="left")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id
    return tokenizer


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def distinct_words(completions, **kwargs):
    return [float(len(set(text.split()))) for text in completions]


COMMON = dict(use_cpu=True, bf16=False, report_to="none", logging_strategy="no",
              save_strategy="no", disable_tqdm=True, seed=0, learning_rate=1e-2,
              per_device_train_batch_size=B, dataloader_num_workers=0)


def grpo(cls, folder, tokenizer, out, **config):
    args = GRPOConfig(output_dir=str(out), num_generations=B, max_completion_length=C,
                      model_init_kwargs={"dtype": torch.float32}, **{**COMMON, **config})
    return cls(model=str(folder), reward_funcs=distinct_words, args=args,
               train_dataset=Dataset.from_list([{"prompt": PROMPT}] * 2 * B),
               processing_class=tokenizer)


def prepared_batch(trainer, *, old: bool, ref: bool) -> dict:
    """What _generate_and_score_completions hands compute_loss: left-padded prompts, completions
    of 6, 4, 6 and 2 tokens, and old / reference log-probs spread around the current ones so
    that both clipping sides and a real KL occur."""
    gen = torch.Generator().manual_seed(7)
    prompt_ids = torch.randint(3, 38, (B, P), generator=gen)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_ids[1, :2] = trainer.processing_class.pad_token_id
    completion_ids = torch.randint(0, VOCAB, (B, C), generator=gen)
    lengths = torch.tensor([6, 4, 6, 2])
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
              "completion_ids": completion_ids, "completion_mask": completion_mask,
              "advantages": torch.tensor([1.0, -0.7, 0.4, -1.2]),
              "num_items_in_batch": completion_mask.sum().float() * 2}
    with torch.no_grad():
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), C)
    ratio = torch.empty(B, C).uniform_(0.6, 1.5, generator=gen)
    ratio[0, :2], ratio[1, :2] = 1.45, 0.65
    if old:
        inputs["old_per_token_logps"] = (logps - ratio.log()) * completion_mask
    if ref:
        inputs["ref_per_token_logps"] = (logps + 0.3 * torch.randn(B, C, generator=gen)
                                         ) * completion_mask
    return inputs


def loss_grads_metrics(trainer, inputs):
    trainer.model.train()
    # Set by TRL's training loop; 2 checks that the loss is scaled for accumulation.
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()
             if p.requires_grad}
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


def assert_same(ours, theirs):
    loss, grads, metrics = ours
    want_loss, want_grads, want_metrics = theirs
    assert math.isclose(loss.item(), want_loss.item(), rel_tol=TOL, abs_tol=1e-7), \
        (loss.item(), want_loss.item())
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert relative_error(grad, want_grads[name]) <= TOL, name
    assert metrics.keys() == want_metrics.keys()
    for name, value in metrics.items():
        assert math.isclose(value, want_metrics[name], rel_tol=TOL, abs_tol=1e-6), \
            (name, value, want_metrics[name])


GRPO_CASES = [dict(loss_type=loss_type, beta=beta)
              for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo") for beta in (0.0, 0.04)] + [
    dict(loss_type="dapo", beta=0.04, use_bias_correction_kl=False, temperature=0.7),
    dict(loss_type="grpo", beta=0.0, entropy_coef=0.05, epsilon_high=0.28),
]


@pytest.mark.parametrize("config", GRPO_CASES, ids=lambda c: "-".join(f"{k}={v}"
                                                                       for k, v in c.items()))
@pytest.mark.parametrize("old", [True, False], ids=["old_logps", "on_policy"])
def test_grpo_loss_gradients_and_metrics_equal_trls(folders, tokenizer, tmp_path, config, old):
    theirs = grpo(GRPOTrainer, folders[0], tokenizer, tmp_path, **config)
    ours = grpo(RbaGRPOTrainer, folders[0], tokenizer, tmp_path, **config)
    inputs = prepared_batch(theirs, old=old, ref=config["beta"] != 0.0)
    assert_same(loss_grads_metrics(ours, inputs), loss_grads_metrics(theirs, inputs))


def lora_grpo(cls, folder, tokenizer, out, **config):
    from peft import LoraConfig

    args = GRPOConfig(output_dir=str(out), num_generations=B, max_completion_length=C,
                      **{**COMMON, **config})
    # Random B as well as A, so that the adapter changes the model from the start.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    return cls(model=load(folder), reward_funcs=distinct_words, args=args,
               train_dataset=Dataset.from_list([{"prompt": PROMPT}] * B),
               processing_class=tokenizer, peft_config=lora)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_with_a_lora_adapter_equals_trls(folders, tokenizer, tmp_path, beta):
    """Through PEFT: the adapter's gradients, and the reference as the adapter switched off."""
    from trl.trainer.utils import use_adapter

    theirs = lora_grpo(GRPOTrainer, folders[0], tokenizer, tmp_path, beta=beta)
    ours = lora_grpo(RbaGRPOTrainer, folders[0], tokenizer, tmp_path, beta=beta)
    inputs = prepared_batch(theirs, old=True, ref=beta != 0.0)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    for adapter in (True, False):
        scores = []
        for trainer in (ours, theirs):
            with torch.no_grad(), (nullcontext() if adapter else
                                   use_adapter(trainer.model, adapter_name=None)):
                logps, entropy, _ = trainer._get_per_token_logps_and_entropies(
                    trainer.model, ids, mask, C, batch_size=3, compute_entropy=True)
            scores.append((logps, entropy))
        for got, want in zip(*scores):
            assert relative_error(got, want) <= TOL
    ours, theirs = (loss_grads_metrics(t, inputs) for t in (ours, theirs))
    lora = [{name: g for name, g in run[1].items() if "lora_" in name} for run in (ours, theirs)]
    assert lora[0] and all(g.abs().sum() > 0 for g in lora[0].values())
    assert_same((ours[0], lora[0], ours[2]), (theirs[0], lora[1], theirs[2]))


def test_grpo_tool_mask_equals_trls(folders, tokenizer, tmp_path):
    """Tool-call tokens (tool_mask 0) are scored but left out of the loss, as in TRL."""
    config = dict(loss_type="dapo", beta=0.04)
    theirs = grpo(GRPOTrainer, folders[0], tokenizer, tmp_path, **config)
    ours = grpo(RbaGRPOTrainer, folders[0], tokenizer, tmp_path, **config)
    inputs = prepared_batch(theirs, old=True, ref=True)
    inputs["tool_mask"] = torch.ones(B, C, dtype=torch.long)
    inputs["tool_mask"][0, 2:4] = inputs["tool_mask"][2, 1] = 0
    assert_same(loss_grads_metrics(ours, inputs), loss_grads_metrics(theirs, inputs))


class _Forbidden:
    """Stands in for TRL's logits-producing loss kernels while an rba-backed trainer runs."""

    @staticmethod
    def apply(*args, **kwargs):
        raise AssertionError("TRL's own LM-head kernel ran inside an rba-backed trainer")


def trained_weights(trainer):
    trainer.train()
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def assert_same_weights(ours, theirs):
    for name, weight in ours.items():
        assert relative_error(weight, theirs[name]) <= WEIGHT_TOL, name


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_two_training_steps_leave_the_same_weights(folders, tokenizer, tmp_path,
                                                        monkeypatch, loss_type):
    # num_iterations=2: the second step reuses the first one's completions, so the old
    # policy's log-probs and ratios away from 1 enter the loss.
    config = dict(loss_type=loss_type, beta=0.04, num_iterations=2, max_steps=2)
    # Each trainer is trained right after it is built: both draw their completions from the
    # RNG stream TRL seeds in its constructor.
    theirs = trained_weights(grpo(GRPOTrainer, folders[0], tokenizer, tmp_path, **config))
    ours_trainer = grpo(RbaGRPOTrainer, folders[0], tokenizer, tmp_path, **config)
    monkeypatch.setattr("trl.trainer.utils._ChunkedLogProbFunction", _Forbidden)
    ours = trained_weights(ours_trainer)
    assert_same_weights(ours, theirs)
    assert ours_trainer.state.global_step == 2


@pytest.mark.parametrize("option, message", [
    (dict(loss_type="cispo"), "loss_type='cispo'"),
    (dict(loss_type="sapo"), "loss_type='sapo'"),
    (dict(importance_sampling_level="sequence"), "importance_sampling_level='sequence'"),
    (dict(delta=2.0), "delta=2.0"),
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile=0.2"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy=True"),
    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold=0.5"),
    (dict(use_liger_kernel=True), "use_liger_kernel=True"),
])
def test_grpo_options_rba_cannot_honour_are_refused_by_name(folders, tokenizer, tmp_path,
                                                            option, message):
    with pytest.raises(UnsupportedOption, match=f"RbaGRPOTrainer does not support "
                                                f"{message.replace('(', '[(]')}"):
        grpo(RbaGRPOTrainer, folders[0], tokenizer, tmp_path, **option)


def test_grpo_soft_capped_logits_are_refused(folders, tokenizer, tmp_path):
    model = load(folders[0])
    model.config.final_logit_softcapping = 30.0
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=B, max_completion_length=C,
                      **COMMON)
    with pytest.raises(UnsupportedOption, match="final_logit_softcapping=30.0"):
        RbaGRPOTrainer(model, distinct_words, args,
                       train_dataset=Dataset.from_list([{"prompt": PROMPT}] * B),
                       processing_class=tokenizer)


# ------------------------------------------------------------------------------- distillation
def distillation(cls, folders, tokenizer, out, **config):
    args = DistillationConfig(output_dir=str(out), max_completion_length=C,
                              model_init_kwargs={"dtype": torch.float32},
                              teacher_model_init_kwargs={"dtype": "float32"},
                              **{**COMMON, **config})
    return cls(model=str(folders[0]), teacher_model=str(folders[1]), args=args,
               train_dataset=Dataset.from_list([{"prompt": PROMPT}] * 2 * B),
               processing_class=tokenizer)


def distillation_batch(with_count: bool) -> dict:
    gen = torch.Generator().manual_seed(3)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[2, :3] = 0
    completion_mask = (torch.arange(C)[None] < torch.tensor([6, 3, 5, 1])[:, None]).long()
    inputs = {"prompt_ids": torch.randint(3, 38, (B, P), generator=gen),
              "prompt_mask": prompt_mask,
              "completion_ids": torch.randint(0, VOCAB, (B, C), generator=gen),
              "completion_mask": completion_mask}
    if with_count:
        inputs["num_items_in_batch"] = completion_mask.sum().float() * 3
        inputs["tool_mask"] = torch.ones(B, C, dtype=torch.long)
        inputs["tool_mask"][0, 1:3] = 0
    return inputs


DISTILL_CASES = [dict(beta=beta) for beta in (0.0, 0.3, 0.5, 1.0)] + [
    dict(beta=0.5, temperature=0.7)]


@pytest.mark.parametrize("config", DISTILL_CASES, ids=lambda c: "-".join(f"{k}={v}"
                                                                         for k, v in c.items()))
@pytest.mark.parametrize("with_count", [False, True], ids=["local_mean", "num_items+tool_mask"])
def test_distillation_loss_gradients_and_entropy_equal_trls(folders, tokenizer, tmp_path, config,
                                                           with_count):
    inputs = distillation_batch(with_count)
    theirs = distillation(DistillationTrainer, folders, tokenizer, tmp_path, **config)
    ours = distillation(RbaDistillationTrainer, folders, tokenizer, tmp_path, **config)
    assert_same(loss_grads_metrics(ours, inputs), loss_grads_metrics(theirs, inputs))


def test_distillation_two_training_steps_leave_the_same_weights(folders, tokenizer, tmp_path,
                                                                monkeypatch):
    config = dict(beta=0.5, max_steps=2)
    theirs = trained_weights(distillation(DistillationTrainer, folders, tokenizer, tmp_path,
                                          **config))
    ours_trainer = distillation(RbaDistillationTrainer, folders, tokenizer, tmp_path, **config)
    monkeypatch.setattr("trl.trainer.distillation_trainer.ChunkedDivergenceFunction",
                        _Forbidden)
    assert_same_weights(trained_weights(ours_trainer), theirs)


def test_distillation_lm_head_bias_is_refused(folders, tokenizer, tmp_path):
    teacher = load(folders[1])
    teacher.lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
    args = DistillationConfig(output_dir=str(tmp_path), max_completion_length=C,
                              model_init_kwargs={"dtype": torch.float32}, **COMMON)
    with pytest.raises(UnsupportedOption, match="a teacher whose LM head has a bias"):
        RbaDistillationTrainer(model=str(folders[0]), teacher_model=teacher, args=args,
                               train_dataset=Dataset.from_list([{"prompt": PROMPT}] * B),
                               processing_class=tokenizer)


# ------------------------------------------------------------------------------- GKD
def gkd(cls, folders, tokenizer, out, **config):
    from trl.experimental.gkd import GKDConfig

    args = GKDConfig(output_dir=str(out), lmbda=0.0, max_length=32,
                     **{**COMMON, "per_device_train_batch_size": 2, **config})
    messages = [[{"role": "user", "content": PROMPT},
                 {"role": "assistant", "content": answer}]
                for answer in ("paris", "it is paris", "the capital is paris", "paris france")]
    return cls(model=load(folders[0]), teacher_model=load(folders[1]), args=args,
               train_dataset=Dataset.from_list([{"messages": m} for m in messages]),
               processing_class=tokenizer)


def gkd_batch() -> dict:
    gen = torch.Generator().manual_seed(5)
    length = P + C
    attention_mask = torch.ones(B, length, dtype=torch.long)
    attention_mask[1, :4] = 0
    input_ids = torch.randint(3, VOCAB, (B, length), generator=gen)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :P] = -100
    labels[3, -2:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.2, 1.0])
@pytest.mark.parametrize("num_items", [None, 17], ids=["local_mean", "num_items"])
def test_gkd_loss_and_gradients_equal_trls(folders, tokenizer, tmp_path, beta, num_items):
    from trl.experimental.gkd import GKDTrainer

    from rba_core.integrations.trl import RbaGKDTrainer

    results = []
    for cls in (RbaGKDTrainer, GKDTrainer):
        trainer = gkd(cls, folders, tokenizer, tmp_path, beta=beta)
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, gkd_batch(), num_items_in_batch=num_items)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone()
                                        for n, p in trainer.model.named_parameters()}, {}))
    assert_same(*results)


def test_gkd_two_training_steps_leave_the_same_weights(folders, tokenizer, tmp_path):
    from trl.experimental.gkd import GKDTrainer

    from rba_core.integrations.trl import RbaGKDTrainer

    theirs = trained_weights(gkd(GKDTrainer, folders, tokenizer, tmp_path, max_steps=2))
    ours = gkd(RbaGKDTrainer, folders, tokenizer, tmp_path, max_steps=2)
    for model in (ours.model, ours.teacher_model):
        # lmbda=0 generates nothing, so the LM heads' own forward would only compute logits.
        model.lm_head.forward = _Forbidden.apply
    assert_same_weights(trained_weights(ours), theirs)


def test_gkd_metrics_needing_logits_are_refused(folders, tokenizer, tmp_path):
    from trl.experimental.gkd import GKDConfig

    from rba_core.integrations.trl import RbaGKDTrainer

    args = GKDConfig(output_dir=str(tmp_path), **COMMON)
    with pytest.raises(UnsupportedOption, match="does not support compute_metrics"):
        RbaGKDTrainer(model=load(folders[0]), teacher_model=load(folders[1]), args=args,
                      train_dataset=Dataset.from_list([{"messages": []}]),
                      processing_class=tokenizer, compute_metrics=lambda prediction: {})


def test_trl_outside_the_supported_range_is_refused_on_import():
    script = ("import trl; trl.__version__ = '1.17.0'\n"
              "import rba_core.integrations.trl")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert ("ImportError: rba_core.integrations.trl supports TRL >=1.16,<1.17, found 1.17.0"
            in result.stderr)
