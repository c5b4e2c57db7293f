"""The dataset folder: ``manifest.jsonl``, sharded audio, run state and ``summary.json``.

Crash safety, in the order things happen for one row: the audio goes to a temporary file that
is fsynced and renamed into place, then the manifest line is appended, flushed and fsynced. So
a kill at any moment leaves at worst (a) an audio file no line lists, (b) a torn last line. On
opening, (b) is cut off and (a) deleted, and the row is made again under the same id. Rows are
never listed twice: the writer refuses an id it already holds.

Only what a writer itself could have left is deleted: temporaries (``rba_core.files``' names)
and clips named as it names them (``audio/SHARD/TASK-sSEED-CANDIDATE.flac``). Any other file
under ``audio/`` is someone else's: it is left in place and reported.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from rba_core.errors import ConfigError
from rba_core.files import exclusive_lock, is_temp_name, sync_handle, write_json_atomic
from rba_core.synth.tts import SAMPLE_RATE, write_flac

MANIFEST = "manifest.jsonl"
SUMMARY = "summary.json"
STATE = "synth_state.json"
AUDIO_DIR = "audio"
LOCK = ".synth.lock"
REQUIRED_FIELDS = ("id", "task", "instruction", "prompt", "response", "audio", "duration",
                   "sample_rate", "voice", "teacher", "tts", "seed", "split",
                   "response_truncated")
TASKS = ("instruct", "qa", "translate", "read", "continue")
SPLITS = ("train", "heldout")
# The path ``audio_path`` gives a row's clip (row ids are ``TASK-sSEED-CANDIDATE``).
_OWN_CLIP = re.compile(rf"^{AUDIO_DIR}/\d{{5,}}/(?:{'|'.join(TASKS)})-s-?\d+-\d{{7,}}\.flac$")

log = logging.getLogger("rba.synth")


def validate_row(row: Any, where: str) -> None:
    """Raise ConfigError naming ``where`` when ``row`` breaks the manifest contract."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: a manifest line must be a JSON object")
    missing = [name for name in REQUIRED_FIELDS if name not in row]
    if missing:
        raise ConfigError(f"{where}: manifest row lacks {', '.join(missing)}")
    if row["task"] not in TASKS:
        raise ConfigError(f"{where}: task {row['task']!r} is not one of {', '.join(TASKS)}")
    if row["split"] not in SPLITS:
        raise ConfigError(f"{where}: split {row['split']!r} is not train or heldout")
    if row["sample_rate"] != SAMPLE_RATE:
        raise ConfigError(f"{where}: sample_rate {row['sample_rate']!r} is not {SAMPLE_RATE}")
    for name in ("id", "instruction", "prompt", "response", "audio", "teacher", "tts"):
        if not isinstance(row[name], str):
            raise ConfigError(f"{where}: {name} must be a string")
    if not isinstance(row["voice"], dict) or "engine" not in row["voice"]:
        raise ConfigError(f"{where}: voice must be an object with an 'engine'")
    audio = Path(row["audio"])
    if audio.is_absolute() or ".." in audio.parts:
        raise ConfigError(f"{where}: audio must be a path inside the dataset folder, got "
                          f"{row['audio']!r}")


def read_manifest(folder: str | os.PathLike, *, check_audio: bool = True) -> list[dict[str, Any]]:
    """Every row of a finished dataset, validated; ``check_audio`` also requires each listed
    audio file to exist. A torn last line (a run killed mid-write) is ignored."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{path}: no manifest; make the dataset with `rba synth --out "
                          f"{folder}`")
    rows, _ = _parse_manifest(path)
    if check_audio:
        for number, row in enumerate(rows, 1):
            if not (Path(folder) / row["audio"]).is_file():
                raise ConfigError(f"{path}:{number}: audio {row['audio']} is missing")
    return rows


def _parse_manifest(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(rows, byte length of the intact part). Only the last line may be torn."""
    data = path.read_bytes()
    rows: list[dict[str, Any]] = []
    ids: set[str] = set()
    good = 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        last = number == len(lines)
        if last and line == b"":
            break
        try:
            if last:
                # No newline after it: the append never finished.
                raise ValueError("unterminated line")
            row = json.loads(line.decode("utf-8"))
            validate_row(row, f"{path}:{number}")
        except (ValueError, UnicodeDecodeError) as error:
            if last:
                break
            raise ConfigError(f"{path}:{number}: corrupt manifest line ({error}); only the last "
                              "line can be torn by a kill, so this file was edited or damaged: "
                              "fix or delete that line") from error
        if row["id"] in ids:
            raise ConfigError(f"{path}:{number}: id {row['id']} is listed twice")
        ids.add(row["id"])
        rows.append(row)
        good += len(line) + 1
    return rows, good


class DatasetWriter:
    """Appends rows to a dataset folder, resuming whatever a previous run left.

    Use as a context manager: it holds an exclusive lock on the folder so two runs cannot
    interleave their appends.
    """

    def __init__(self, folder: str | os.PathLike, *, shard_size: int = 1000) -> None:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ConfigError(f"shard_size must be an integer >= 1, got {shard_size!r}")
        self.folder = Path(folder)
        self.shard_size = shard_size
        self.rows: list[dict[str, Any]] = []
        self.ids: set[str] = set()
        self.repaired: dict[str, int] = {"torn_lines": 0, "orphan_files": 0}
        # Unlisted files under audio/ that this writer did not name: kept, and reported.
        self.foreign_files: list[str] = []
        self._manifest: Any = None
        self._held = contextlib.ExitStack()

    def __enter__(self) -> "DatasetWriter":
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"--out {self.folder}: exists and is not a folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(exclusive_lock(self.folder / LOCK, wait=False))
            except BlockingIOError as error:
                raise ConfigError(f"--out {self.folder}: another `rba synth` is writing this "
                                  "folder; wait for it or pick another --out") from error
            self._recover()
            self._manifest = stack.enter_context(open(self.folder / MANIFEST, "ab"))
            self._held = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._held.close()

    def _recover(self) -> None:
        path = self.folder / MANIFEST
        if path.is_file():
            self.rows, good = _parse_manifest(path)
            if good < path.stat().st_size:
                with open(path, "r+b") as handle:
                    handle.truncate(good)
                    sync_handle(handle)
                self.repaired["torn_lines"] = 1
        self.ids = {row["id"] for row in self.rows}
        listed = {row["audio"] for row in self.rows}
        audio_root = self.folder / AUDIO_DIR
        if audio_root.is_dir():
            for file in sorted(audio_root.rglob("*")):
                if not file.is_file() and not file.is_symlink():
                    continue
                relative = file.relative_to(self.folder).as_posix()
                if relative in listed:
                    continue
                # The writer makes regular files only: a link is never its own.
                if file.is_symlink():
                    self.foreign_files.append(relative)
                elif is_temp_name(file.name):
                    file.unlink()
                elif _OWN_CLIP.match(relative):
                    file.unlink()
                    self.repaired["orphan_files"] += 1
                else:
                    self.foreign_files.append(relative)
        if self.repaired["torn_lines"] or self.repaired["orphan_files"]:
            log.warning("resumed %s: dropped %d torn manifest line(s) and %d unlisted clip(s) "
                        "of an interrupted run", self.folder, self.repaired["torn_lines"],
                        self.repaired["orphan_files"])
        if self.foreign_files:
            shown = ", ".join(self.foreign_files[:5])
            more = f" and {len(self.foreign_files) - 5} more" if len(self.foreign_files) > 5 \
                else ""
            log.warning("%s: left %d file(s) under %s/ that rba synth did not write (%s%s); "
                        "they are not part of the dataset", self.folder,
                        len(self.foreign_files), AUDIO_DIR, shown, more)

    def audio_path(self, row_id: str) -> str:
        """Where the next row's audio goes: shard folders of ``shard_size`` rows."""
        shard = len(self.rows) // self.shard_size
        return f"{AUDIO_DIR}/{shard:05d}/{row_id}.flac"

    def add(self, row: dict[str, Any], wave: np.ndarray) -> dict[str, Any]:
        """Write ``wave`` and append ``row`` (its ``audio``, ``duration`` and ``sample_rate``
        filled in here). Returns the row as listed."""
        if row["id"] in self.ids:
            raise ConfigError(f"row {row['id']} is already in {self.folder / MANIFEST}")
        row = dict(row)
        row["audio"] = self.audio_path(row["id"])
        row["duration"] = round(len(wave) / SAMPLE_RATE, 3)
        row["sample_rate"] = SAMPLE_RATE
        validate_row(row, f"row {row['id']}")
        write_flac(self.folder / row["audio"], wave)
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        self._manifest.write(line)
        sync_handle(self._manifest)
        self.rows.append(row)
        self.ids.add(row["id"])
        return row

    def count(self, task: str) -> int:
        return sum(1 for row in self.rows if row["task"] == task)

    def load_state(self) -> dict[str, Any]:
        path = self.folder / STATE
        if not path.is_file():
            return {"tasks": {}}
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ConfigError(f"{path}: unreadable run state ({error}); delete it to restart "
                              "candidate numbering (rows already written are kept)") from error
        if not isinstance(state, dict) or not isinstance(state.get("tasks"), dict):
            raise ConfigError(f"{path}: not a run state written by `rba synth`; delete it")
        return state

    def save_state(self, state: dict[str, Any]) -> None:
        write_json_atomic(self.folder / STATE, state)

    def write_summary(self, state: dict[str, Any]) -> dict[str, Any]:
        summary = summarize(self.rows, state)
        write_json_atomic(self.folder / SUMMARY, summary)
        return summary


def summarize(rows: list[dict[str, Any]], state: dict[str, Any]) -> dict[str, Any]:
    """Counts, hours of audio, voices per split and filter statistics per task."""
    def block(selected: list[dict[str, Any]]) -> dict[str, Any]:
        seconds = sum(float(row["duration"]) for row in selected)
        return {"rows": len(selected), "hours": round(seconds / 3600, 4),
                "mean_duration_s": round(seconds / len(selected), 3) if selected else 0.0,
                "response_truncated": sum(1 for row in selected if row["response_truncated"])}

    summary: dict[str, Any] = {"total": block(rows), "splits": {}, "tasks": {}}
    for split in SPLITS:
        chosen = [row for row in rows if row["split"] == split]
        entry = block(chosen)
        entry["voices"] = sorted({row["voice"]["voice"] for row in chosen})
        summary["splits"][split] = entry
    train_voices = set(summary["splits"]["train"]["voices"])
    summary["heldout_voices_unseen_in_train"] = sorted(
        set(summary["splits"]["heldout"]["voices"]) - train_voices)
    for task in TASKS:
        chosen = [row for row in rows if row["task"] == task]
        task_state = state.get("tasks", {}).get(task)
        if not chosen and task_state is None:
            continue
        entry = block(chosen)
        entry["splits"] = dict(Counter(row["split"] for row in chosen))
        if task_state is not None:
            entry["filters"] = task_state.get("filters", {})
            entry["config"] = task_state.get("config", {})
        summary["tasks"][task] = entry
    return summary

