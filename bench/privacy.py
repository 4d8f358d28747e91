"""`python -m bench privacy`: the core fleet: accuracy vs epsilon for record-level DP (DP-SGD on
devices) and client-level DP (GNMax votes), and Flower's DP-FedAvg at the same client-level epsilon."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import GNMAX, NO_BASELINES, header, run_row, run_variant, save_figure

EPSILONS = (1.0, 2.0, 4.0, 8.0)


def privacy(out: Path, overrides: dict) -> dict:
    """Accuracy vs epsilon on the core fleet; DP-FedAvg at the same client-level epsilon, same run."""
    base = {**NO_BASELINES, **overrides}
    record_eps = (1.0, 2.0, 3.0, 4.0, 8.0)  # 3: the Tramer & Boneh centralized DP-SGD reference point
    # Client-level: GNMax votes on few queries per round. The L2 sensitivity of a reply is
    # sqrt(|Q|), so the noise std per vote count grows with the number of queries per round.
    client = {**GNMAX, "distill.query_size": int(base.pop("client_query_size", 10))}
    rows: dict[str, dict] = {"non-private": run_row(run_variant(out, "non-private", base))}
    rows["fedavg"] = run_row(run_variant(out, "fedavg", {**base, "method": "fedavg"}))
    for eps in EPSILONS:
        rows[f"client-eps{eps:g}"] = run_row(
            run_variant(out, f"client-eps{eps:g}", {**base, **client, "privacy.target_epsilon": eps})
        )
        rows[f"dp-fedavg-eps{eps:g}"] = run_row(
            run_variant(
                out,
                f"dp-fedavg-eps{eps:g}",
                {**base, "method": "dp-fedavg", "privacy.target_epsilon": eps, "privacy.delta": 1e-5},
            )
        )
    for eps in record_eps:
        rows[f"record-eps{eps:g}"] = run_row(
            run_variant(
                out,
                f"record-eps{eps:g}",
                {
                    **base,
                    "privacy.record_level": True,
                    "privacy.record_target_epsilon": eps,
                    "privacy.record_delta": 1e-5,
                },
            )
        )
    summary = {
        **header("privacy", overrides),
        "rounds": rows["non-private"]["rounds_run"],
        "runs": rows,
        "gap_points_client_eps4_vs_dp_fedavg": 100
        * (rows["client-eps4"]["accuracy"] - rows["dp-fedavg-eps4"]["accuracy"]),
        "record_eps3_accuracy": rows["record-eps3"]["accuracy"],
    }
    plot_frontier(rows, record_eps, out / "frontier.png")
    (out / "privacy.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_frontier(rows: dict, record_eps: tuple, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(
        record_eps,
        [rows[f"record-eps{e:g}"]["accuracy"] for e in record_eps],
        "o-",
        label="feddistill, record-level DP-SGD on devices (unit: record)",
    )
    ax.plot(
        EPSILONS,
        [rows[f"client-eps{e:g}"]["accuracy"] for e in EPSILONS],
        "s-",
        label="feddistill, client-level GNMax votes (unit: client)",
    )
    ax.plot(
        EPSILONS,
        [rows[f"dp-fedavg-eps{e:g}"]["accuracy"] for e in EPSILONS],
        "^-",
        label="Flower DP-FedAvg (unit: client)",
    )
    ax.axhline(rows["non-private"]["accuracy"], color="black", linestyle="--", label="feddistill, non-private")
    ax.axhline(rows["fedavg"]["accuracy"], color="tab:red", linestyle="--", label="Flower FedAvg, non-private")
    public_only = rows["non-private"]["public_only_student_accuracy"]
    if public_only is not None:
        ax.axhline(public_only, color="gray", linestyle=":", label="student from the public teacher alone")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({*record_eps, *EPSILONS}), [f"{e:g}" for e in sorted({*record_eps, *EPSILONS})])
    ax.set_xlabel("epsilon (delta = 1e-5; PLD accountant)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("Fashion-MNIST, 100 clients, Dirichlet 0.5: accuracy vs epsilon")
    save_figure(fig, path)
