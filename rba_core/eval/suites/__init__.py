"""The benchmark suites of ``rba eval``: each turns its data into ``Item``s and scores one
system's answers to them.

- ``synth``: a dataset split in the ``rba synth`` layout (default: the held-out split).
- ``ifeval``: Google's 541 IFEval prompts and checker, spoken.
- ``nq``: Natural Questions open (test, 1,769 questions), spoken.
- ``translate``: speech-to-text translation, from an ``rba synth --task translate`` split or a
  JSON Lines file of the user's own (source, reference) pairs, spoken.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rba_core.errors import ConfigError

if TYPE_CHECKING:
    from rba_core.data.tokenizer import Tokenizer
    from rba_core.eval.report import Metric
    from rba_core.eval.systems import Item, System
    from rba_core.models.llama import LlamaForCausalLM
    from rba_core.rollout import SamplingConfig

SUITES = ("synth", "ifeval", "nq", "translate")


@dataclass
class SuiteOptions:
    """What the suites read from the command line."""

    data: Path | None = None
    split: str = "heldout"
    limit: int = 0
    engine: str = "espeak"
    voices: tuple[str, ...] = ()
    piper_voices: tuple[str, ...] = ()
    audio_cache: Path | None = None
    seed: int = 0
    progress: bool = True
    # The language a pairs file's rows without "target_language" ask for (``rba synth``'s
    # default, so a folder and a file of the same task read the same prompt).
    target_language: str = "French"


@dataclass
class Context:
    """What scoring needs besides the answers: the teacher (the teacher gap), the decode
    settings (a second pass such as the repeat check), and the batch size."""

    teacher: "LlamaForCausalLM"
    tokenizer: "Tokenizer"
    sampling: "SamplingConfig"
    batch_size: int
    seed: int
    progress: bool


class Suite(ABC):
    """``items()`` loads the suite's items (left-out ones in ``left_out``, with why), and
    ``evaluate`` returns one record per item for a system: ``{"answer", "scores", ...}``."""

    name: str
    metrics: tuple["Metric", ...]

    def __init__(self, options: SuiteOptions) -> None:
        self.options = options
        self.description = ""
        self.left_out: list[dict[str, Any]] = []

    @abstractmethod
    def items(self, tokenizer: "Tokenizer") -> list["Item"]:
        """The suite's items; the ones it cannot use go to ``left_out`` with why."""

    @abstractmethod
    def evaluate(self, system: "System", items: Sequence["Item"], context: Context
                 ) -> list[dict[str, Any]]:
        """One record per item for ``system``: ``{"answer", "scores", ...}``."""


def answer_texts(system: "System", items: Sequence["Item"], context: Context, *,
                 prompt: str | None = None, what: str = "answers"
                 ) -> tuple[list[list[int]], list[str]]:
    """The system's answers to ``items`` as ids and decoded text, with a progress bar."""
    from tqdm import tqdm

    with tqdm(total=len(items), desc=f"{system.name}: {what}", unit="item",
              disable=not context.progress) as bar:
        ids = system.answer_ids(items, context.sampling, prompt=prompt,
                                batch_size=context.batch_size, seed=context.seed, progress=bar)
    texts = [context.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]
    return ids, texts


def first(items: list[Any], limit: int) -> list[Any]:
    """The first ``limit`` items in file order (0: all): a fixed subset, the same for every
    system and never chosen by results."""
    if limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {limit}")
    return items[:limit] if limit else items


def spoken_items(suite: Suite, prompts: Sequence[tuple[str, str, str, dict[str, Any]]]
                 ) -> list["Item"]:
    """Items from (id, text, task prompt, gold) with ``text`` spoken by the chosen engine in
    held-out voices (``rba_core.eval.speech``); prompts too long to hear whole, or that the
    engine fails on, go to ``suite.left_out``."""
    from rba_core.eval.speech import speak
    from rba_core.eval.systems import Item
    from rba_core.weights.prepare import cache_root

    options = suite.options
    cache = options.audio_cache or Path(cache_root()) / "eval-audio"
    spoken = speak([(pid, text) for pid, text, _, _ in prompts], engine=options.engine,
                   voices=options.voices, cache_dir=cache, seed=options.seed,
                   progress=options.progress, piper_voices=options.piper_voices)
    items = []
    for (pid, text, prompt, gold), clip in zip(prompts, spoken):
        if clip.audio is None:
            suite.left_out.append({"id": pid, "reason": clip.reason,
                                   "seconds": round(clip.duration, 2)})
            continue
        items.append(Item(pid, text, prompt, clip.audio, options.engine, gold,
                          {"voice": clip.voice, "seconds": round(clip.duration, 2)}))
    return items


def make_suite(name: str, options: SuiteOptions) -> Suite:
    if name == "synth":
        from rba_core.eval.suites.synth import SynthSuite

        return SynthSuite(options)
    if name == "ifeval":
        from rba_core.eval.suites.ifeval import IFEvalSuite

        return IFEvalSuite(options)
    if name == "nq":
        from rba_core.eval.suites.nq import NQSuite

        return NQSuite(options)
    if name == "translate":
        from rba_core.eval.suites.translate import TranslateSuite

        return TranslateSuite(options)
    raise ConfigError(f"--suite must be one of {', '.join(SUITES)}, got {name!r}")
