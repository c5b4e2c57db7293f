"""Flags that several `rba` sub-commands share, parsed the same way everywhere."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rba_core.rollout.sampling import SamplingConfig


def add_sampling_flags(parser: argparse.ArgumentParser, *, max_new_tokens: int = 64) -> None:
    """--max-new-tokens, --temperature (greedy by default), --top-k, --top-p, --min-p, --seed."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                       help=f"most tokens per answer (default: {max_new_tokens})")
    group.add_argument("--temperature", type=float, default=0.0,
                       help="sampling temperature; 0 = greedy (default: 0)")
    group.add_argument("--top-k", type=int, default=0, metavar="K",
                       help="sample among the K most likely tokens (default: 0 = all)")
    group.add_argument("--top-p", type=float, default=1.0, metavar="P",
                       help="sample from the smallest set of tokens whose probability reaches P "
                            "(default: 1 = all)")
    group.add_argument("--min-p", type=float, default=0.0, metavar="P",
                       help="drop tokens less likely than P times the most likely one "
                            "(default: 0 = off)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the sampling (and of an untrained adapter) (default: 0)")


def sampling_from_args(args: argparse.Namespace, stop_ids: Sequence[int]) -> "SamplingConfig":
    """The validated SamplingConfig of ``add_sampling_flags``' flags; errors name the flag."""
    from rba_core.rollout.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              min_p=args.min_p, max_new_tokens=args.max_new_tokens,
                              stop_ids=tuple(int(t) for t in stop_ids))
    sampling.validate(name=lambda field: "--" + field.replace("_", "-"))
    return sampling
