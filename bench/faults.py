"""`python -m bench faults`: the core fleet with 20 % hostile clients (each attack) under a robust
aggregator and under the plain mean, and with 30 % dropouts per round."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import NO_BASELINES, header, run_row, run_variant, save_figure

ATTACKS = ("label-flip", "random", "scaled", "nan", "wrong-shape")
FINITE_ATTACKS = ("label-flip", "random")  # valid-looking answers; scaled/NaN/wrong shapes fail validation


def faults(out: Path, overrides: dict) -> dict:
    """20 % hostile clients per attack (robust aggregator; plain mean for contrast); 30 % dropouts."""
    base = {**NO_BASELINES, **overrides}
    robust = base.pop("robust_aggregator", "outlier-filtered")
    contrast = [a for a in str(base.pop("mean_contrast", ",".join(FINITE_ATTACKS))).split(",") if a]
    # "non-private" is the privacy suite's clean run: same config, shared when --out points at the same runs
    rows = {
        "clean-mean": run_row(run_variant(out, "non-private", base)),
        f"clean-{robust}": run_row(run_variant(out, f"clean-{robust}", {**base, "distill.aggregator": robust})),
    }
    rows["dropout30-mean"] = run_row(run_variant(out, "dropout30-mean", {**base, "scenario.dropout": 0.3}))
    for attack in ATTACKS:
        hostile = {**base, "scenario.hostile_fraction": 0.2, "scenario.attack": attack}
        rows[f"{attack}-{robust}"] = run_row(
            run_variant(out, f"{attack}-{robust}", {**hostile, "distill.aggregator": robust})
        )
        if attack in contrast:  # only finite attacks reach an aggregator: validation drops the others
            rows[f"{attack}-mean"] = run_row(run_variant(out, f"{attack}-mean", hostile))
    for name, results_dir in ((n, out / "runs" / ("non-private" if n == "clean-mean" else n)) for n in rows):
        rounds = json.loads((results_dir / "results.json").read_text())["rounds"]
        rows[name]["dropped_replies"] = sum(
            sum((r.get("dropped") or {}).values()) if isinstance(r.get("dropped"), dict) else int(r.get("dropped") or 0)
            for r in rounds
        )
    clean = rows[f"clean-{robust}"]["accuracy"]
    summary = {
        **header("faults", overrides),
        "robust_aggregator": robust,
        "rounds": rows["clean-mean"]["rounds_run"],
        "runs": rows,
        "robust_gap_points_vs_clean": {a: 100 * (clean - rows[f"{a}-{robust}"]["accuracy"]) for a in ATTACKS},
        "mean_gap_points_vs_clean": {
            a: 100 * (rows["clean-mean"]["accuracy"] - rows[f"{a}-mean"]["accuracy"]) for a in contrast
        },
        "dropout30_cost_points": 100 * (rows["clean-mean"]["accuracy"] - rows["dropout30-mean"]["accuracy"]),
    }
    plot_faults(rows, robust, out / "faults.png")
    (out / "faults.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_faults(rows: dict, robust: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacks = ["clean", *ATTACKS]
    x = np.arange(len(attacks))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(
        x - 0.2,
        [rows.get(f"{a}-mean", {}).get("accuracy", np.nan) for a in attacks],
        0.4,
        label="plain mean (where run)",
    )
    ax.bar(x + 0.2, [rows[f"{a}-{robust}"]["accuracy"] for a in attacks], 0.4, label=robust)
    ax.axhline(rows["dropout30-mean"]["accuracy"], color="gray", linestyle=":", label="30 % dropouts (mean)")
    ax.set_xticks(x, attacks)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Fashion-MNIST, 100 clients: 20 % hostile clients per attack")
    save_figure(fig, path)
