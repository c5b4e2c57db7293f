"""One ``rba eval`` run: every system answers the same items of one suite, then the summaries,
the paired differences and the files (``results.json``, ``results.md``, ``results.png``).

    results = run_eval(EvalConfig(
        suite="nq", systems=[SystemSpec("teacher (text)", teacher=True), SystemSpec("untrained"),
                             SystemSpec("default", adapter=DEFAULT_ADAPTER_DIR)],
        paths=ModelPaths(encoder_dir, llm_dir), sampling=SamplingConfig(max_new_tokens=32),
        options=SuiteOptions(limit=100), out=Path("eval-nq")))
"""
from __future__ import annotations

import datetime
import gc
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rba_core.errors import ConfigError
from rba_core.eval import report
from rba_core.eval.bootstrap import RESAMPLES
from rba_core.eval.suites import Context, SuiteOptions, make_suite
from rba_core.eval.systems import (
    ModelPaths, TeacherText, load_speech_system, load_teacher, with_stops,
)
from rba_core.rollout import SamplingConfig

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
RESULTS_PNG = "results.png"
# One file per finished system: a rerun with the same settings reuses it instead of answering
# again (a long run on a shared CPU that dies in its third system keeps the first two).
SYSTEMS_DIR = "systems"


@dataclass
class SystemSpec:
    """A line of the comparison: the teacher reading the text (``teacher``), or the SpeechLM
    with the adapter folder ``adapter`` (None: a fresh, untrained adapter)."""

    name: str
    adapter: Path | None = None
    teacher: bool = False


@dataclass
class EvalConfig:
    suite: str
    systems: list[SystemSpec]
    paths: ModelPaths
    sampling: SamplingConfig
    options: SuiteOptions = field(default_factory=SuiteOptions)
    out: Path | None = None
    batch_size: int = 8
    resamples: int = RESAMPLES
    seed: int = 0
    progress: bool = True
    command: str = ""

    def validate(self) -> None:
        if not self.systems:
            raise ConfigError("nothing to evaluate: pass --teacher-text, --untrained or "
                              "--adapter NAME=DIR (any number of them)")
        names = [s.name for s in self.systems]
        if len(set(names)) != len(names):
            raise ConfigError(f"system names must differ, got {names}; name each --adapter")
        if self.batch_size < 1 or self.resamples < 1:
            raise ConfigError(f"--batch-size and --resamples must be >= 1, got "
                              f"{self.batch_size} and {self.resamples}")


def _log(message: str) -> None:
    print(f"rba eval: {message}", file=sys.stderr, flush=True)


def _machine() -> str:
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} with {torch.get_num_threads()} thread(s)")


def _without_unreadable_audio(items: list[Any], suite: Any) -> list[Any]:
    """The items whose clip loads as the SpeechLM takes it (at most 30 s, checked from the
    header before decoding; decodable; long enough for one frame). The others go to
    ``suite.left_out`` with why, before any system answers, so every system answers the
    same items and one bad clip cannot end the run."""
    from rba_core.data.audio import load_speech
    from rba_core.errors import AudioError, AudioTooLong

    kept = []
    for item in items:
        if item.audio is not None:
            try:
                load_speech(item.audio)
            except AudioTooLong:
                suite.left_out.append({"id": item.id, "reason": "too_long"})
                continue
            except AudioError:
                suite.left_out.append({"id": item.id, "reason": "unreadable_audio"})
                continue
        kept.append(item)
    return kept


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Evaluate every system of ``config`` on its suite; write the files when ``config.out``."""
    config.validate()
    teacher, tokenizer = load_teacher(config.paths)
    suite = make_suite(config.suite, config.options)
    items = _without_unreadable_audio(suite.items(tokenizer), suite)
    for left in suite.left_out:
        _log(f"left out {left['id']}: {left['reason']}")
    if suite.left_out:
        counts = report.reason_counts_text(suite.left_out)
        _log(f"left out {len(suite.left_out)} items ({counts}); {len(items)} remain")
    if len(items) < 2:
        raise ConfigError(f"--suite {config.suite}: {len(items)} items to evaluate (left out: "
                          f"{len(suite.left_out)}); need at least 2 for intervals")
    context = Context(teacher=teacher, tokenizer=tokenizer,
                      sampling=with_stops(config.sampling, tokenizer),
                      batch_size=config.batch_size, seed=config.seed, progress=config.progress)
    records: dict[str, list[dict[str, Any]]] = {}
    systems: dict[str, dict[str, Any]] = {}
    for spec in config.systems:
        signature = _signature(config, spec, items, context.sampling)
        saved = _saved(config.out, spec.name, signature)
        if saved is not None:
            records[spec.name], seconds = saved["records"], saved["seconds"]
            _log(f"{spec.name}: reusing its answers from an earlier run with the same settings")
        else:
            start = time.perf_counter()
            if spec.teacher:
                system = TeacherText(spec.name, teacher, tokenizer)
            else:
                system = load_speech_system(spec.name, config.paths, spec.adapter,
                                            seed=config.seed)
            records[spec.name] = suite.evaluate(system, items, context)
            system.close()
            gc.collect()
            seconds = round(time.perf_counter() - start, 1)
            _log(f"{spec.name}: {len(items)} items in {seconds:.0f} s")
            if config.out is not None:
                report.write_json(_system_file(config.out, spec.name),
                                  {"signature": signature, "records": records[spec.name],
                                   "seconds": seconds})
        systems[spec.name] = {"kind": "teacher" if spec.teacher else "speechlm",
                              "adapter": str(spec.adapter) if spec.adapter else None,
                              "seconds": seconds}

    groups = sorted({item.group for item in items})
    for name, rows in records.items():
        systems[name]["summary"] = _dicts(report.summarize(
            rows, suite.metrics, resamples=config.resamples, seed=config.seed))
        systems[name]["groups"] = {
            g: _dicts(report.summarize([r for r, item in zip(rows, items) if item.group == g],
                                       suite.metrics, resamples=config.resamples,
                                       seed=config.seed))
            for g in groups} if len(groups) > 1 else {}
    results = {
        "suite": suite.name, "description": suite.description, "items": len(items),
        "left_out": suite.left_out, "left_out_counts": report.reason_counts(suite.left_out),
        "groups": groups, "command": config.command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(), "sampling": asdict(context.sampling),
        "resamples": config.resamples, "seed": config.seed,
        "metrics": [asdict(m) for m in suite.metrics], "systems": systems,
        "differences": report.differences(records, suite.metrics, resamples=config.resamples,
                                          seed=config.seed),
        "per_item": [{"id": item.id, "text": item.text, "prompt": item.prompt,
                      "audio": str(item.audio) if item.audio else None, "group": item.group,
                      "gold": item.gold, **item.meta,
                      "answers": {name: rows[i] for name, rows in records.items()}}
                     for i, item in enumerate(items)],
    }
    if config.out is not None:
        write_results(Path(config.out), results, suite.metrics)
    return results


def _system_file(out: Path, name: str) -> Path:
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    return Path(out) / SYSTEMS_DIR / f"{slug}-{hashlib.sha256(name.encode()).hexdigest()[:8]}.json"


def _signature(config: EvalConfig, spec: SystemSpec, items: list[Any],
               sampling: SamplingConfig) -> str:
    """What a system's answers depend on: the items, the decode settings, the models and the
    adapter's weights (by size and modification time)."""
    weights = []
    for folder in (spec.adapter, config.paths.llm, config.paths.encoder, config.paths.teacher):
        if folder is not None:
            for file in sorted(Path(folder).glob("*.safetensors")):
                stat = file.stat()
                weights.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    blob = json.dumps({"suite": config.suite, "spec": asdict(spec), "sampling": asdict(sampling),
                       "seed": config.seed, "batch_size": config.batch_size,
                       "dtype": str(config.paths.dtype), "weights": weights,
                       "items": [[i.id, i.text, i.prompt, str(i.audio)] for i in items]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _saved(out: Path | None, name: str, signature: str) -> dict[str, Any] | None:
    if out is None:
        return None
    path = _system_file(out, name)
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("signature") == signature else None


def _dicts(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {key: interval.to_dict() for key, interval in summary.items()}


def write_results(out: Path, results: dict[str, Any], metrics: Any) -> str:
    """results.json, results.md and (with matplotlib) results.png in ``out``; returns the
    markdown."""
    from rba_core.files import write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / RESULTS_JSON, results)
    table = report.markdown(results, metrics)
    write_text_atomic(out / RESULTS_MD, table)
    why_not = report.bar_chart(out / RESULTS_PNG, results, metrics)
    if why_not:
        _log(why_not)
    return table
