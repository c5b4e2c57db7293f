"""The device names users write (``--device``, ``run.device``) checked before any work, so a
typo or a GPU that is not there is one clear line, not a traceback from deep inside torch."""
from __future__ import annotations

from typing import TYPE_CHECKING

from rba_core.errors import ConfigError

if TYPE_CHECKING:
    import torch


def parse_device(name: object, option: str = "device") -> "torch.device":
    """``name`` as a torch device that exists here ("cpu", "cuda", "cuda:1", ...); a
    ConfigError naming ``option`` and the fix otherwise."""
    import torch

    if not isinstance(name, str):
        raise ConfigError(f"{option} must be a device name such as cpu or cuda, got {name!r}")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{option} {name!r} is not a device torch knows; use cpu, cuda or "
                          "cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else \
                "a torch that sees no GPU"
            raise ConfigError(f"{option} {name!r} needs a CUDA GPU, but this is {build}; use "
                              f"{option} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{option} {name!r}: only {count} GPU(s) are visible "
                              f"(cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        raise ConfigError(f"{option} {name!r}: rba runs on cpu or cuda devices")
    return device
