"""The wheel a user installs (not the editable checkout the tests run from) carries every module,
config and asset: an editable install finds a subpackage missing from setup.py's list, a wheel
silently leaves it out."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_holds_every_module_config_and_asset(tmp_path):
    env = {**os.environ, "RBA_NO_NATIVE": "1"}  # the C++ ops are not what this checks
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(tmp_path), str(ROOT)], check=True, env=env,
                   capture_output=True)
    wheel, = tmp_path.glob("rba-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rba_core").rglob("*.py")}
    wanted |= {p.relative_to(ROOT).as_posix()
               for p in (ROOT / "rba_core" / "tasks" / "configs").glob("*.yaml")}
    wanted |= {p.relative_to(ROOT).as_posix()
               for p in (ROOT / "rba_core" / "assets").rglob("*") if p.is_file()}
    wanted |= {"rba_core/kernels/" + p.name for p in (ROOT / "kernels").glob("*.py")}
    missing = sorted(wanted - names)
    assert not missing, f"the wheel lacks {missing}"
