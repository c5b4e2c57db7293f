"""rba_core.dtypes: the dtype names users write map to torch dtypes; others get one clear line."""
from __future__ import annotations

import pytest
import torch

from rba_core.dtypes import DTYPE_NAMES, parse_dtype
from rba_core.errors import ConfigError


def test_every_name_is_its_torch_dtype():
    assert [parse_dtype(name) for name in DTYPE_NAMES] == [
        torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("name", ["fp32", "int8", "", None, torch.float32])
def test_other_names_are_refused_naming_the_option(name):
    with pytest.raises(ConfigError, match=r"--dtype must be one of float32, bfloat16, float16"):
        parse_dtype(name, "--dtype")


def test_allowed_narrows_the_choice():
    assert parse_dtype("bfloat16", "run.dtype", ("float32", "bfloat16")) == torch.bfloat16
    with pytest.raises(ConfigError, match=r"run.dtype must be one of float32, bfloat16 "
                                          r"\(got 'float16'\)"):
        parse_dtype("float16", "run.dtype", ("float32", "bfloat16"))
