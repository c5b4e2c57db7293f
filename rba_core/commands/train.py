"""``rba train``: CTC alignment, SFT or KD of the SpeechLM's adapter on a dataset folder.

    rba train --config rba_core/tasks/configs/align.yaml data.dir=data/speech
    rba train --config rba_core/tasks/configs/kd.yaml data.dir=data/speech run.max_steps=200
    torchrun --nproc_per_node=4 -m rba_core.cli train --config kd.yaml data.dir=data/speech
"""
from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the SpeechLM (align, sft or kd) on a synthesized dataset",
        description="Train the SpeechLM's adapter (and LoRA, if configured) with CTC "
                    "alignment to the LLM's token embeddings (align), SFT or KD. "
                    "Settings come from a YAML file (see rba_core/tasks/configs/) and "
                    "section.field=value overrides. Launch under torchrun for several "
                    "processes; a run resumes from its output folder's newest checkpoint.",
    )
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML configuration (default: the built-in defaults, task kd)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in run.output_dir from its newest checkpoint, "
                             "and fail if it has none (run.resume=auto, the default, also "
                             "resumes but starts afresh when there is no checkpoint; "
                             "run.resume=DIR resumes from one checkpoint folder)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides such as optim.lr=3e-4 run.max_steps=100 task=sft")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import logging

    import yaml

    from rba_core.tasks import build_task, build_task_config, load_task_config
    from rba_core.train import (
        Trainer, config_to_dict, init_distributed, seed_everything, shutdown,
    )

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("run.resume=auto")
    if args.config is not None:
        config = load_task_config(args.config, overrides)
    else:
        config = build_task_config({}, overrides)
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    if args.resume:
        from rba_core.errors import CheckpointError
        from rba_core.train.checkpoint import latest_checkpoint

        if latest_checkpoint(config.run.output_dir) is None:
            raise CheckpointError(f"--resume: {config.run.output_dir} holds no checkpoint; "
                                  "check run.output_dir or drop --resume to start a new run")

    from rba_core.train.distributed import barrier, unsharded
    from rba_core.train.run_lock import run_lock

    info = init_distributed(config.run.device)
    try:
        if info.is_main:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        # Held from before the models load until the adapter is written, so a second run on
        # this folder is refused at once and never sees a half-exported adapter.
        with run_lock(config.run.output_dir, info):
            # The same seed on every rank gives every replica the same fresh adapter.
            seed_everything(config.seed)
            task = build_task(config, info.device)
            if info.is_main:
                facts = task.describe()
                print(f"rba train: {facts['task']} on {facts['rows']} rows of {facts['data']} "
                      f"({facts['trainable_parameters']:,} of {facts['parameters']:,} "
                      f"parameters trainable; {info.world_size} process(es) on {info.device})",
                      file=sys.stderr)
                if facts["skipped_rows"]:
                    print(f"rba train: skipped manifest rows: {facts['skipped_rows']}",
                          file=sys.stderr)
                if facts.get("augment"):
                    print(f"rba train: augmenting the train clips ({facts['augment']})",
                          file=sys.stderr)
            result = Trainer(config, task, dist_info=info).train()
            adapter_dir = result.output_dir / "adapter"
            # LoRA weights inside FSDP-sharded layers are gathered on every rank for the export.
            sharded = task.fsdp_modules() if config.run.strategy == "fsdp" else []
            with unsharded(sharded):
                if info.is_main:
                    task.export(adapter_dir)
                barrier(info)
        if info.is_main:
            loss = result.last_metrics.get("loss")
            if result.stopped_by_budget:
                print(f"rba train: run.time_budget_minutes={config.run.time_budget_minutes:g} "
                      f"spent ({result.train_seconds:.0f} s of steps) at step {result.step}",
                      file=sys.stderr)
            print(f"rba train: {result.step} steps ({result.skipped_steps} skipped), last loss "
                  f"{loss if loss is None else f'{loss:.4f}'}; "
                  f"{_skipped_samples(result.skipped_samples)}; adapter in {adapter_dir}, "
                  f"metrics in {result.output_dir / 'metrics.jsonl'}")
    finally:
        shutdown(info)
    return 0


def _skipped_samples(counts: dict[str, int]) -> str:
    """``2 samples skipped (unreadable_audio 1, too_long 1)``, or that none were."""
    if not counts:
        return "no samples skipped"
    reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
    return f"{sum(counts.values())} samples skipped ({reasons})"
