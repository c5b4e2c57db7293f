"""rba_core.files: atomic file and folder writes keep the old content on any failure, leave no
temporary behind, and the lock refuses a second holder."""
from __future__ import annotations

import json
import os

import pytest

from rba_core.files import (
    atomic_folder, exclusive_lock, is_temp_name, remove_stale_temps, write_atomic,
    write_json_atomic, write_text_atomic,
)


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_json_atomic(path, {"step": 1, "name": "é"})
    assert path.read_text(encoding="utf-8") == '{\n  "step": 1,\n  "name": "é"\n}\n'

    def dies(temporary):
        temporary.write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, dies)
    assert json.loads(path.read_text()) == {"step": 1, "name": "é"}
    assert os.listdir(path.parent) == ["state.json"]
    write_text_atomic(path, "two\n")
    assert path.read_text() == "two\n" and os.listdir(path.parent) == ["state.json"]


def test_written_files_are_not_private(tmp_path):
    write_text_atomic(tmp_path / "config.json", "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_folder_replaces_or_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("first")
    assert (target / "a.txt").read_text() == "first"

    with pytest.raises(RuntimeError, match="converter failed"):
        with atomic_folder(target) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError("converter failed")
    assert os.listdir(tmp_path) == ["model"] and (target / "a.txt").read_text() == "first"

    with atomic_folder(target) as staging:
        (staging / "b.txt").write_text("second")
    assert os.listdir(tmp_path) == ["model"] and os.listdir(target) == ["b.txt"]


def test_stale_temps_are_recognised_and_removed(tmp_path):
    (tmp_path / ".model.0a1b2c3d.tmp").mkdir()
    (tmp_path / ".model.0a1b2c3d.tmp" / "x").write_text("x")
    (tmp_path / ".other.99999999.tmp").write_text("busy")
    (tmp_path / "model").mkdir()
    (tmp_path / "notes.tmp").write_text("a user's file")
    assert is_temp_name(".clip.flac.tmp") and not is_temp_name("notes.tmp")
    remove_stale_temps(tmp_path, "model")
    assert sorted(os.listdir(tmp_path)) == [".other.99999999.tmp", "model", "notes.tmp"]
    remove_stale_temps(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model", "notes.tmp"]


def test_exclusive_lock_refuses_a_second_holder(tmp_path):
    # flock locks belong to an open file, so a second open in this process stands in for
    # a second process.
    lock = tmp_path / ".lock"
    with exclusive_lock(lock):
        with pytest.raises(BlockingIOError):
            with exclusive_lock(lock, wait=False):
                pass
    with exclusive_lock(lock, wait=False):
        pass
