"""Self-synthesis: the teacher writes instructions (Magpie) and answers, a TTS engine speaks
the instructions, and the rows land in a resumable dataset folder (``rba synth``).

    from rba_core.synth import SynthConfig, run_synth, read_manifest

    summary = run_synth(SynthConfig(task="instruct", num=100, out="data/synth"))
    rows = read_manifest("data/synth")
"""
from rba_core.synth.dataset import DatasetWriter, read_manifest, summarize
from rba_core.synth.dedupe import DedupeConfig, NearDuplicateIndex, jaccard, shingles
from rba_core.synth.pipeline import SynthConfig, run_synth, split_voices, stable_seed
from rba_core.synth.recipes import RECIPES, TaskRecipe, teacher_user_message
from rba_core.synth.teacher import Generation, RolloutTeacher, magpie_prefix
from rba_core.synth.text import (
    normalize_for_speech,
    number_to_words,
    repetition_reason,
    unspeakable_reason,
)
from rba_core.synth.tts import (
    EngineMix,
    EspeakBackend,
    FliteBackend,
    PiperBackend,
    SynthesisFailed,
    Voice,
    make_backend,
    postprocess,
)
from rba_core.synth.wer import word_error_rate

__all__ = [
    "DatasetWriter", "DedupeConfig", "EngineMix", "EspeakBackend", "FliteBackend",
    "Generation", "NearDuplicateIndex", "PiperBackend", "RECIPES", "RolloutTeacher", "SynthConfig",
    "SynthesisFailed", "TaskRecipe", "Voice", "jaccard", "magpie_prefix", "make_backend",
    "normalize_for_speech", "number_to_words", "postprocess", "read_manifest",
    "repetition_reason", "run_synth", "shingles", "split_voices", "stable_seed", "summarize",
    "teacher_user_message", "unspeakable_reason", "word_error_rate",
]
