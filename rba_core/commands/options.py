"""Flags that several `rba` sub-commands share, parsed the same way everywhere."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rba_core.dtypes import DTYPE_NAMES

if TYPE_CHECKING:
    import torch

    from rba_core.rollout.sampling import SamplingConfig


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--dtype and --device of the commands that load models."""
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                        help="weight dtype (default: float32)")
    parser.add_argument("--device", default="cpu",
                        help="torch device: cpu, cuda or cuda:N (default: cpu)")


def model_placement(args: argparse.Namespace) -> "tuple[torch.dtype, torch.device]":
    """The checked (dtype, device) of ``add_model_flags``' flags; errors name the flag. The
    sampling flags are checked too (without stop ids), so a bad flag fails before any model
    loads."""
    from rba_core.devices import parse_device
    from rba_core.dtypes import parse_dtype

    sampling_from_args(args, ())
    return parse_dtype(args.dtype, "--dtype"), parse_device(args.device, "--device")


def add_sampling_flags(parser: argparse.ArgumentParser, *, max_new_tokens: int | None = 64
                       ) -> None:
    """--max-new-tokens, --temperature (greedy by default), --top-k, --top-p, --min-p, --seed.
    ``max_new_tokens`` None leaves the default to the command (``args.max_new_tokens`` is then
    None until the command fills it in, e.g. per task)."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                       help="most tokens per answer (default: "
                            f"{max_new_tokens if max_new_tokens is not None else 'see above'})")
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
