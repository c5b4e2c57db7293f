"""The dtype names users write (``--dtype``, config files) and the torch dtypes they mean."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rba_core.errors import ConfigError

if TYPE_CHECKING:
    import torch

# Each name is the torch attribute it stands for. Names, not torch objects, so that argparse
# can list them as choices without `rba --help` importing torch.
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16", "float64")


def parse_dtype(name: object, option: str = "dtype",
                allowed: Sequence[str] = DTYPE_NAMES) -> "torch.dtype":
    """The torch dtype ``name`` stands for; a ConfigError naming ``option`` (the flag or
    config key) and the ``allowed`` names when it is not one of them."""
    if name not in allowed:
        raise ConfigError(f"{option} must be one of {', '.join(allowed)} (got {name!r})")
    import torch

    return getattr(torch, name)
