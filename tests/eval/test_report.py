"""The report of rba eval: summaries and paired differences per metric (weighted where the
metric says), the markdown tables, and the bar chart skipped with a clear line when
matplotlib is missing."""
from __future__ import annotations

import sys

import pytest

from rba_core.eval import report
from rba_core.eval.report import Metric

METRICS = (Metric("hit", "hit", True, percent=True),
           Metric("share", "share", True, percent=True, weight="count"))


def _records(hits, shares, counts):
    return [{"scores": {"hit": h, "share": s, "count": c}} for h, s, c in zip(hits, shares, counts)]


def _results():
    a = _records([1, 1, 0, 1], [1.0, 0.5, 0.0, 1.0], [1, 2, 1, 4])
    b = _records([0, 1, 0, 0], [0.0, 0.5, 0.0, 0.25], [1, 2, 1, 4])
    systems = {name: {"summary": {k: v.to_dict() for k, v in report.summarize(
        rows, METRICS, resamples=200, seed=0).items()}, "groups": {}}
        for name, rows in (("A", a), ("B", b))}
    return a, b, {"suite": "toy", "description": "four items", "items": 4,
                  "left_out": [{"id": "x", "reason": "longer than 30 s"}], "groups": ["espeak"],
                  "systems": systems,
                  "differences": report.differences({"A": a, "B": b}, METRICS, resamples=200,
                                                    seed=0)}


def test_weighted_metric_is_a_ratio_of_sums():
    a, _, results = _results()
    # Instruction-level style: (1*1 + 0.5*2 + 0*1 + 1*4) / (1+2+1+4) = 6/8.
    assert results["systems"]["A"]["summary"]["share"]["estimate"] == pytest.approx(6 / 8)
    assert results["systems"]["A"]["summary"]["hit"]["estimate"] == pytest.approx(3 / 4)
    diff = {d["metric"]: d for d in results["differences"]}
    assert diff["hit"]["estimate"] == pytest.approx(2 / 4)
    assert diff["share"]["estimate"] == pytest.approx((6 - 2) / 8)
    assert (diff["hit"]["a"], diff["hit"]["b"]) == ("A", "B")


def test_markdown_tables():
    _, _, results = _results()
    text = report.markdown(results, METRICS)
    assert "Left out: 1 items (longer than 30 s 1)" in text
    assert "| system | hit ↑ | share ↑ |" in text
    assert "| A | 75.0 [" in text
    assert "| A | B | 50.0 [" in text


def test_bar_chart_written_or_skipped_with_a_reason(tmp_path, monkeypatch):
    _, _, results = _results()
    assert report.bar_chart(tmp_path / "r.png", results, METRICS) is None
    assert (tmp_path / "r.png").stat().st_size > 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    why = report.bar_chart(tmp_path / "s.png", results, METRICS)
    assert "matplotlib is not installed" in why and not (tmp_path / "s.png").exists()
