"""The task registry and the task config sections: task names pick the config class and builder,
unknown names and moved keys fail naming the fix, each task's section is validated, the
packaged configs load and round-trip, and the align and sft/kd tasks share the speech base
(batching, empty batches) but weight batches by their own tokens."""
from __future__ import annotations

import pytest
import torch
import yaml

from helpers import CONFIG_DIR, speech_config
from rba_core.errors import ConfigError
from rba_core.tasks import TASKS, build_task, build_task_config, load_task_config, task_spec
from rba_core.tasks.align import AlignConfig, SpeechAlignTask, transcript_ids
from rba_core.tasks.distill import KD_KINDS, DistillConfig, SpeechDistillTask
from rba_core.tasks.speech import SpeechTask
from rba_core.train import TrainerConfig, build_config, config_to_dict


def test_task_names_pick_their_config_class():
    assert {"align", "sft", "kd"} <= set(TASKS)
    assert type(build_task_config({}, ["task=align"])) is AlignConfig
    assert type(build_task_config({}, ["task=sft"])) is DistillConfig
    default = build_task_config()
    assert type(default) is DistillConfig and default.task == "kd"
    for spec in TASKS.values():
        assert issubclass(spec.config, TrainerConfig)


@pytest.mark.parametrize("values", [{"task": "ppo"}, {"task": 3}, {"task": None}])
def test_unknown_task_lists_the_known_ones(values):
    known = ", ".join(sorted(TASKS))
    assert "align, kd" in known
    with pytest.raises(ConfigError, match=rf"^task must be one of {known} \(got "):
        build_task_config(values)
    with pytest.raises(ConfigError, match=known):
        task_spec(values["task"])


def test_build_task_wants_the_tasks_own_config_class():
    config = build_config(DistillConfig, {"task": "sft"})
    config.task = "align"
    with pytest.raises(TypeError, match="takes a AlignConfig, got a DistillConfig"):
        build_task(config, torch.device("cpu"))
    # Built directly, a class refuses a task name it does not serve.
    with pytest.raises(ConfigError, match="^task must be one of align "):
        build_config(AlignConfig, {"task": "kd"})


def test_the_old_loss_section_names_the_kd_section(tmp_path):
    config = build_task_config({}, ["task=kd", "kd.kind=jsd", "kd.jsd_beta=0.3"])
    assert (config.kd.kind, config.kd.jsd_beta) == ("jsd", 0.3)
    with pytest.raises(ConfigError, match="'loss' is no longer read.*kd.kind"):
        build_task_config({}, ["task=kd", "loss.kind=jsd"])
    old = tmp_path / "old.yaml"
    old.write_text("task: sft\nloss:\n  kind: forward_kl\n")
    with pytest.raises(ConfigError, match="rename 'loss:' to 'kd:'"):
        load_task_config(old)
    with pytest.raises(ConfigError, match="task=align has no loss settings"):
        build_task_config({"task": "align", "loss": {"kind": "jsd"}})
    with pytest.raises(ConfigError, match="unknown config field 'optim.lrr'.*'optim.lr'"):
        build_task_config({}, ["task=align", "optim.lrr=1"])


@pytest.mark.parametrize("task, override, field", [
    ("kd", "kd.kind=l2", "kd.kind"),
    ("kd", "kd.temperature=0", "kd.temperature"),
    ("kd", "kd.jsd_beta=1", "kd.jsd_beta"),
    ("sft", "data.batch_size=0", "data.batch_size"),
    ("sft", "data.split=test", "data.split"),
    ("sft", "data.max_duration=31", "data.max_duration"),
    ("kd", "model.llm=/no/such/model", "model.llm"),
    ("kd", "model.lora_rank=-1", "model.lora_rank"),
    ("kd", "optim.lr=0", "optim.lr"),
    ("align", "model.lora_rank=2", "model.lora_rank"),
    ("align", "data.batch_size=0", "data.batch_size"),
])
def test_each_tasks_sections_are_validated(task, override, field):
    with pytest.raises(ConfigError) as error:
        build_task_config({}, [f"task={task}", override])
    assert str(error.value).startswith(field + " must be"), str(error.value)


def test_kd_kinds_are_the_kernels():
    from rba_core.kernels.linear_distill import KINDS

    assert KD_KINDS is KINDS
    for kind in KINDS:
        assert build_task_config({}, [f"kd.kind={kind}"]).kd.kind == kind


def test_shipped_configs_load_and_round_trip(tmp_path):
    shipped = {p.stem: p for p in CONFIG_DIR.glob("*.yaml")}
    assert set(shipped) >= {"align", "sft", "kd"}
    for name in ("align", "sft", "kd"):
        config = load_task_config(shipped[name])
        assert config.task == name and isinstance(config, task_spec(name).config)
        written = tmp_path / f"{name}.yaml"
        written.write_text(yaml.safe_dump(config_to_dict(config)))
        assert load_task_config(written) == config
    config = load_task_config(shipped["kd"], ["optim.lr=3e-4", "kd.temperature=1.5",
                                              "data.batch_size=3", "model.lora_rank=4"])
    assert config.optim.lr == pytest.approx(3e-4) and config.kd.temperature == 1.5
    assert config.data.batch_size == 3 and config.model.lora_rank == 4
    # An override may switch the task, and with it the config class; a section only the
    # other task reads says whose it is.
    assert type(load_task_config(shipped["kd"], ["task=sft"])) is DistillConfig
    assert type(load_task_config(shipped["align"], ["task=kd"])) is DistillConfig
    with pytest.raises(ConfigError, match="section 'kd' belongs to task kd / sft, not "
                                          "task=align; remove it, or set task to kd or sft"):
        load_task_config(shipped["kd"], ["task=align"])


def test_align_and_distill_share_the_speech_base_but_weight_their_own_tokens(tiny_models,
                                                                            tmp_path):
    assert issubclass(SpeechAlignTask, SpeechTask) and issubclass(SpeechDistillTask, SpeechTask)
    assert not issubclass(SpeechAlignTask, SpeechDistillTask)
    settings = ["data.batch_size=6", "run.max_steps=1"]
    align = build_task(speech_config(tiny_models, tmp_path / "a", "task=align", *settings),
                       torch.device("cpu"))
    sft = build_task(speech_config(tiny_models, tmp_path / "s", "task=sft", *settings),
                     torch.device("cpu"))
    assert isinstance(align, SpeechAlignTask) and isinstance(sft, SpeechDistillTask)
    batch = next(iter(sft.train_batches(0, 0, 1, 0)))
    assert [b.ids for b in align.train_batches(0, 0, 1, 0)] == [batch.ids]  # same batching
    transcript_tokens = sum(len(transcript_ids(align.speechlm.tokenizer, row))
                            for row in batch.rows)
    response_tokens = int(batch.response_mask.sum())
    assert transcript_tokens != response_tokens
    assert align.batch_weight(batch) == transcript_tokens
    assert sft.batch_weight(batch) == response_tokens
    for task in (align, sft):
        assert task.batch_weight(None) == 0.0
        zero, metrics = task.loss(None)
        assert float(zero.detach()) == 0.0 and metrics == {"empty_batches": 1.0}
        zero.backward()     # a zero loss that still reaches every trainable parameter
        facts = task.describe()
        assert facts["task"] == task.task and facts["rows"] == len(task.dataset) == 6
        assert 0 < facts["trainable_parameters"] < facts["parameters"]
    with pytest.raises(ValueError, match="task must be one of sft, kd"):
        SpeechDistillTask(sft.speechlm, sft.dataset, task="align", batch_size=2)
    with pytest.raises(ValueError, match="needs a teacher"):
        SpeechDistillTask(sft.speechlm, sft.dataset, task="kd", batch_size=2)
