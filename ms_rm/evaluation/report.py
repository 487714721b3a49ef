"""An evaluation's report: report.json (everything), report.md (a table per metric) and, for rewards
measured over a grid of u, accuracy_vs_u.png. Each written atomically."""

from __future__ import annotations

import logging
import os
from typing import Dict, List

from ..core.errors import MissingDependencyError
from ..io.files import atomic_file, write_json

logger = logging.getLogger(__name__)

PAIR_METRICS = ("accuracy",)
RANKING_METRICS = ("imagereward_acc", "hpsv2_imagereward_acc", "hpsv2_inversion_score")


def metric_names(report: Dict) -> tuple:
    return PAIR_METRICS if report["kind"] == "pairs" else RANKING_METRICS


def markdown(report: Dict) -> str:
    """One table: a row per reward and u, a column per metric (accuracies in %)."""
    names = metric_names(report)
    count = f"{report['pairs']} pairs" if report["kind"] == "pairs" else \
        f"{report['rankings']} rankings of {report['generations']} generations"
    lines = [f"# Evaluation on {report.get('data', 'preference data')} ({count})", "",
             "| reward | u | " + " | ".join(names) + (" | 95% interval |" if report["kind"] == "pairs" else " |"),
             "|---|---|" + "---|" * (len(names) + (report["kind"] == "pairs"))]
    for label, entry in report["rewards"].items():
        for result in entry["results"]:
            u = "" if result["u"] is None else f"{result['u']:g}" + (" *" if result["u"] == entry["u"] else "")
            cells = [f"{100 * result[n]:.2f}" for n in names]
            if report["kind"] == "pairs":
                cells.append(f"{100 * result['interval'][0]:.2f} - {100 * result['interval'][1]:.2f}")
            lines.append(f"| {label} | {u} | " + " | ".join(cells) + " |")
    if "combination" in report:
        combo = report["combination"]
        mix = " + ".join(f"{w:g} {k}" for k, w in combo["weights"].items())
        cells = [f"{100 * combo[n]:.2f}" for n in names]
        if report["kind"] == "pairs":
            cells.append(f"{100 * combo['interval'][0]:.2f} - {100 * combo['interval'][1]:.2f}")
        lines.append(f"| {mix} |  | " + " | ".join(cells) + " |")
    if any(len(e["results"]) > 1 for e in report["rewards"].values()):
        lines += ["", "\\* the u of the reward's headline figure (agreement and combination use it)."]
    if report["agreement"]:
        tau = report["kind"] == "rankings"
        lines += ["", "| rewards | pairs ordered alike" + (" | Kendall tau (mean per prompt) |" if tau else " |"),
                  "|---|---|" + ("---|" if tau else "")]
        for row in report["agreement"]:
            cells = [f"{100 * row['fraction']:.2f}%"] + ([f"{row['kendall_tau']:.3f}"] if tau else [])
            lines.append(f"| {' vs '.join(row['rewards'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_u(report: Dict, path: str) -> bool:
    """Accuracy against u for every reward measured at several u (pairs: with the 95% band).
    False (nothing written) when no reward has a grid."""
    grids = {label: e["results"] for label, e in report["rewards"].items() if len(e["results"]) > 1}
    if not grids:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("the accuracy-vs-u plot needs matplotlib: pip install ms-rm[eval] "
                                     "(or pass --no-plot)") from None
    name = metric_names(report)[0]
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for label, results in grids.items():
        us = [r["u"] for r in results]
        axes.plot(us, [100 * r[name] for r in results], marker="o", label=label)
        if report["kind"] == "pairs":
            axes.fill_between(us, [100 * r["interval"][0] for r in results],
                              [100 * r["interval"][1] for r in results], alpha=0.2)
    axes.set_xlabel("u (noise level)")
    axes.set_ylabel(("pairwise accuracy" if name == "accuracy" else name) + " (%)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_file(path, "wb") as f:
        figure.savefig(f, format="png")
    plt.close(figure)
    return True


def write_report(report: Dict, out: str, plot: bool = True) -> List[str]:
    """report.json, report.md and (with a grid of u) accuracy_vs_u.png in `out`; their paths."""
    os.makedirs(out, exist_ok=True)
    written = [os.path.join(out, "report.json"), os.path.join(out, "report.md")]
    write_json(written[0], report)
    with atomic_file(written[1]) as f:
        f.write(markdown(report))
    if plot and plot_accuracy_vs_u(report, os.path.join(out, "accuracy_vs_u.png")):
        written.append(os.path.join(out, "accuracy_vs_u.png"))
    return written
