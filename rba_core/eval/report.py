"""What ``rba eval`` writes: per-system summaries with bootstrap intervals (also per TTS
engine), the paired differences between every two systems, a markdown table, the JSON with
every item, and a bar chart.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rba_core.eval.bootstrap import Interval, mean_interval, paired_difference


@dataclass(frozen=True)
class Metric:
    """A headline metric: the per-item score ``key`` averaged over items (weighted by the
    per-item score ``weight`` when given, e.g. instruction-level accuracy by the number of
    instructions), shown as a percentage when ``percent``; ``higher_is_better`` None for a
    descriptive one (answer length)."""

    key: str
    label: str
    higher_is_better: bool | None
    percent: bool = False
    weight: str | None = None

    def heading(self) -> str:
        if self.higher_is_better is None:
            return self.label
        return f"{self.label} {'↑' if self.higher_is_better else '↓'}"

    def show(self, value: float) -> str:
        return f"{100 * value:.1f}" if self.percent else f"{value:.3f}"


def _column(records: Sequence[dict[str, Any]], key: str) -> list[float]:
    return [float(r["scores"][key]) for r in records]


def summarize(records: Sequence[dict[str, Any]], metrics: Sequence[Metric], *, resamples: int,
              seed: int) -> dict[str, Interval]:
    """Each metric's (weighted) mean over ``records`` (one per item: ``{"scores": {...}}``)
    with its bootstrap interval."""
    return {m.key: mean_interval(_column(records, m.key),
                                 _column(records, m.weight) if m.weight else None,
                                 resamples=resamples, seed=seed)
            for m in metrics}


def differences(per_system: dict[str, Sequence[dict[str, Any]]], metrics: Sequence[Metric], *,
                resamples: int, seed: int) -> list[dict[str, Any]]:
    """For every two systems (in the order given) and every metric: the first minus the second,
    with its paired bootstrap interval over the items both answered."""
    out = []
    for (a, rows_a), (b, rows_b) in itertools.combinations(per_system.items(), 2):
        for m in metrics:
            weights = _column(rows_a, m.weight) if m.weight else None
            interval = paired_difference(_column(rows_a, m.key), _column(rows_b, m.key),
                                         weights, resamples=resamples, seed=seed)
            out.append({"a": a, "b": b, "metric": m.key, **interval.to_dict(),
                        "significant": interval.excludes_zero()})
    return out


def _cell(metric: Metric, interval: dict[str, float]) -> str:
    return (f"{metric.show(interval['estimate'])} "
            f"[{metric.show(interval['low'])}, {metric.show(interval['high'])}]")


def reason_counts(left_out: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many items were left out for each reason."""
    counts: dict[str, int] = {}
    for left in left_out:
        counts[left["reason"]] = counts.get(left["reason"], 0) + 1
    return dict(sorted(counts.items()))


def reason_counts_text(left_out: Sequence[dict[str, Any]]) -> str:
    """``reason n, reason n`` for the summaries."""
    return ", ".join(f"{reason} {n}" for reason, n in reason_counts(left_out).items())


def markdown(results: dict[str, Any], metrics: Sequence[Metric]) -> str:
    """The summary table (a line per system, and per system and engine when the items mix
    engines) and the table of paired differences."""
    lines = [f"Suite `{results['suite']}`: {results['items']} items "
             f"({results['description']}); mean [95% bootstrap interval]"]
    if results.get("left_out"):
        lines.append(f"Left out: {len(results['left_out'])} items "
                     f"({reason_counts_text(results['left_out'])})")
    groups = results.get("groups") or []
    lead = "| system | engine |" if len(groups) > 1 else "| system |"
    lines += ["", lead + "".join(f" {m.heading()} |" for m in metrics),
              "|---" * (lead.count("|") - 1 + len(metrics)) + "|"]
    for name, system in results["systems"].items():
        rows = [("all", system["summary"])]
        if len(groups) > 1:
            rows += [(g, system["groups"][g]) for g in groups]
        for group, summary in rows:
            head = f"| {name} | {group} |" if len(groups) > 1 else f"| {name} |"
            lines.append(head + "".join(f" {_cell(m, summary[m.key])} |" for m in metrics))
    if results["differences"]:
        by_key = {m.key: m for m in metrics}
        lines += ["", "Paired differences (A minus B), 95% bootstrap interval; * = excludes 0", "",
                  "| A | B |" + "".join(f" {m.label} |" for m in metrics),
                  "|---|---|" + "---|" * len(metrics)]
        pairs: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        for d in results["differences"]:
            pairs.setdefault((d["a"], d["b"]), {})[d["metric"]] = d
        for (a, b), cells in pairs.items():
            row = f"| {a} | {b} |"
            for m in metrics:
                d = cells[m.key]
                row += f" {_cell(by_key[m.key], d)}{' *' if d['significant'] else ''} |"
            lines.append(row)
    return "\n".join(lines) + "\n"


def write_json(path: Path, results: dict[str, Any]) -> None:
    from rba_core.files import write_json_atomic

    write_json_atomic(path, results)


def bar_chart(path: Path, results: dict[str, Any], metrics: Sequence[Metric]) -> str | None:
    """One panel per metric, a bar per system with its 95% interval; returns why it was not
    drawn (matplotlib missing) or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ("matplotlib is not installed, so no bar chart (pip install matplotlib, or the "
                "plot / eval extra)")
    names = list(results["systems"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        scale = 100 if metric.percent else 1
        est = [scale * results["systems"][n]["summary"][metric.key]["estimate"] for n in names]
        low = [scale * results["systems"][n]["summary"][metric.key]["low"] for n in names]
        high = [scale * results["systems"][n]["summary"][metric.key]["high"] for n in names]
        errors = [[e - lo for e, lo in zip(est, low)], [hi - e for e, hi in zip(est, high)]]
        ax.bar(range(len(names)), est, yerr=errors, capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric.heading(), fontsize=9)
    fig.suptitle(f"rba eval --suite {results['suite']} ({results['items']} items, 95% CI)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
