"""`python -m bench frontier`: accuracy and upload bytes of feddistill (each aggregator and privacy
unit) and its peers on the core fleet, Dirichlet alpha 0.5 and 0.1, over seeds (mean and spread)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import GNMAX, NO_BASELINES, header, run_row, run_variant, save_figure

# The frontier's methods (issue 7): feddistill with each aggregator and privacy unit, and the peers
# a user would pick instead. Flower's (DP-)FedAvg runs twice: from the same public pretraining
# the teacher gets, and from scratch (Flower's strategy as it comes: the peer in docs/references.md).
FRONTIER_METHODS = {
    "non-private": {},
    "fedavg": {"method": "fedavg"},
    "fedavg-scratch": {"method": "fedavg", "baselines.fedavg_init": "scratch"},
    "client-eps4": {**GNMAX, "privacy.target_epsilon": 4.0},
    "dp-fedavg-eps4": {"method": "dp-fedavg", "privacy.target_epsilon": 4.0, "privacy.delta": 1e-5},
    "dp-fedavg-scratch-eps4": {
        "method": "dp-fedavg",
        "privacy.target_epsilon": 4.0,
        "privacy.delta": 1e-5,
        "baselines.fedavg_init": "scratch",
    },
    "record-eps2": {"privacy.record_level": True, "privacy.record_target_epsilon": 2.0, "privacy.record_delta": 1e-5},
    "record-eps8": {"privacy.record_level": True, "privacy.record_target_epsilon": 8.0, "privacy.record_delta": 1e-5},
    "era": {"distill.aggregator": "era"},
    "median": {"distill.aggregator": "median"},
    "trimmed-mean": {"distill.aggregator": "trimmed-mean"},
    "outlier-filtered": {"distill.aggregator": "outlier-filtered"},
}


# (alpha, seed, methods) in the order they run: every method once per alpha at seed 0, then the
# headline comparison at two more seeds, then the other aggregators; the JSON is rewritten after
# each run, so an interrupted suite (continued with --keep) still reports what it has.
HEADLINE = ("non-private", "fedavg", "client-eps4", "dp-fedavg-eps4", "fedavg-scratch", "dp-fedavg-scratch-eps4")


FRONTIER_PLAN = (
    (0.5, 0, HEADLINE),
    (0.1, 0, (*HEADLINE, "record-eps2")),
    (0.5, 1, HEADLINE),
    (0.5, 2, HEADLINE),
    (0.5, 0, ("era", "median", "trimmed-mean", "outlier-filtered", "record-eps2", "record-eps8")),
    (0.1, 0, ("record-eps8",)),
)


def frontier(out: Path, overrides: dict) -> dict:
    """Accuracy and upload bytes per method, alpha in {0.5, 0.1}, over seeds (mean and spread)."""
    base = {**NO_BASELINES, **overrides}
    runs: dict[str, dict] = {}
    summary: dict = {}
    for alpha, seed, methods in FRONTIER_PLAN:
        for method in methods:
            name = f"alpha{alpha:g}-seed{seed}-{method}"
            # local-only needs the fleet's partition: it runs once per alpha, with the first
            # non-private run (centralized pools the same data for every alpha: once, at 0.5)
            extra = {}
            if method == "non-private" and seed == 0:
                extra = {"baselines.local_only": True, "baselines.centralized": alpha == 0.5}
            results = run_variant(
                out,
                name,
                {**base, **FRONTIER_METHODS[method], **extra, "fleet.alpha": alpha, "seed": seed},
                baselines=bool(extra),
            )
            runs[name] = {"alpha": alpha, "seed": seed, "method": method, **run_row(results)}
            for peer in ("local_only", "centralized"):
                if peer in results.get("baselines", {}):
                    b = results["baselines"][peer]
                    runs[name][peer] = b.get("accuracy_mean", b.get("accuracy"))
            summary = _frontier_summary(out, overrides, runs)
    plot_frontier_alpha(summary, out / "frontier.png")
    return summary


def _frontier_summary(out: Path, overrides: dict, runs: dict) -> dict:
    import numpy as np

    table: dict[str, dict] = {}
    for row in runs.values():
        cell = table.setdefault(f"alpha{row['alpha']:g}", {}).setdefault(row["method"], {"accuracies": [], "seeds": []})
        cell["accuracies"].append(row["accuracy"])
        cell["seeds"].append(row["seed"])
        cell["bytes_per_client_round"] = row["bytes_per_client_round"]
        for key in ("client_level", "record_level"):
            if row[key]:
                cell["epsilon"] = row[key]["epsilon"]
                cell["unit"] = row[key]["unit"]
        for peer in ("local_only", "centralized"):
            if peer in row:
                table[f"alpha{row['alpha']:g}"][peer] = {"accuracies": [row[peer]], "seeds": [row["seed"]]}
        if row["method"] == "non-private" and row["public_only_student_accuracy"] is not None:
            cell = table[f"alpha{row['alpha']:g}"].setdefault("public_only", {"accuracies": [], "seeds": []})
            cell["accuracies"].append(row["public_only_student_accuracy"])
            cell["seeds"].append(row["seed"])
    for cells in table.values():
        for cell in cells.values():
            acc = np.asarray(cell["accuracies"])
            cell.update(
                mean=float(acc.mean()),
                std=float(acc.std(ddof=1)) if len(acc) > 1 else None,
                min=float(acc.min()),
                max=float(acc.max()),
                n=len(acc),
            )
    # the client-level comparison, paired by seed (same partition and seed in both runs)
    by = {(r["alpha"], r["seed"], r["method"]): r["accuracy"] for r in runs.values()}
    gaps: list[dict] = []
    for peer in ("dp-fedavg-eps4", "dp-fedavg-scratch-eps4"):
        for alpha in sorted({a for a, _, _ in by}, reverse=True):
            points = [
                100 * (by[(alpha, seed, "client-eps4")] - by[(alpha, seed, peer)])
                for seed in sorted({s for a, s, _ in by if a == alpha})
                if (alpha, seed, "client-eps4") in by and (alpha, seed, peer) in by
            ]
            if points:
                gaps.append(
                    {
                        "alpha": alpha,
                        "peer": peer,
                        "points_per_seed": points,
                        "mean": float(np.mean(points)),
                        "min": float(np.min(points)),
                    }
                )
    summary = {
        **header("frontier", overrides),
        "note": "every run: 100 clients, q=0.1 Poisson, the same rounds; std is the sample std over seeds",
        "table": table,
        "gap_points_client_eps4_vs_dp_fedavg": gaps,
        "runs": runs,
    }
    (out / "frontier.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_frontier_alpha(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted(summary["table"], key=lambda a: -float(a[len("alpha") :]))
    methods = [m for m in FRONTIER_METHODS if any(m in summary["table"][a] for a in alphas)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(alphas)
    for i, alpha in enumerate(alphas):
        cells = [summary["table"][alpha].get(m) for m in methods]
        xs = [j + i * width for j in range(len(methods))]
        ax.bar(
            xs,
            [c["mean"] if c else 0 for c in cells],
            width,
            yerr=[[c["mean"] - c["min"] if c else 0 for c in cells], [c["max"] - c["mean"] if c else 0 for c in cells]],
            label=f"Dirichlet alpha = {alpha[len('alpha') :]}",
            capsize=2,
        )
    ax.set_xticks(
        [j + width * (len(alphas) - 1) / 2 for j in range(len(methods))], methods, rotation=40, ha="right", fontsize=8
    )
    first = summary["table"][alphas[0]]
    for key, style, label in (
        ("centralized", "k--", "centralized, non-private"),
        ("public_only", "k:", f"public data alone (round 0), alpha {alphas[0][len('alpha') :]}"),
    ):
        if key in first:
            ax.axhline(first[key]["mean"], color=style[0], linestyle=style[1:], linewidth=1, label=label)
    ax.set_ylabel("test accuracy (mean, min-max over seeds)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Fashion-MNIST, 100 clients: feddistill and peers, same fleet and rounds")
    save_figure(fig, path)
