"""Benchmarks: `python -m bench SUITE [--out DIR]`. Each writes JSON (config, environment,
figures) and PNG plots under bench/results/SUITE/. Not part of the test run.

Suites:
  core     Fashion-MNIST, 100 clients, Dirichlet 0.5: feddistill vs Flower FedAvg on the same
           fleet and rounds, local-only, centralized, public teacher; accuracy and upload bytes.
  privacy  the same fleet: accuracy vs epsilon for record-level DP (DP-SGD on devices) and
           client-level DP (GNMax votes), and Flower's DP-FedAvg at the same client-level epsilon.
  faults   the same fleet with 20 % hostile clients (each attack) under a robust aggregator and
           under the plain mean, and with 30 % dropouts per round.
  audit    `feddistill audit` on digits runs (non-private, record-level eps 8 and 2, client-level
           GNMax eps 4): AUC, TPR at 1 % and 0.1 % FPR, empirical eps vs claimed eps per target;
           and the audit's time on the digits quick start and on a Fashion-MNIST run.
  deploy   3 SuperNodes on loopback (TLS, node auth) vs the simulation engine on the same digits
           run: seconds per round; the client footprint (install size, ClientApp import time,
           peak RSS of a SuperNode with the ClientApp processes it starts).
  comms    upload bytes and accuracy for answers in float32, float16, uint8 and one-byte votes.
  scale    time per round and peak RSS (whole process tree) for 10, 100 and 1000 clients, and the
           orchestration overhead: the same 100-client run on Flower's simulation engine vs
           in-process (bench/inprocess.py), measured in the same benchmark.
  ceiling  no DP: the student trained on the reference set's true labels (its ceiling) and the
           accuracy of the fleet's aggregated answers as every client joins (bench/ceiling.py).
  fuzz     10,000 hypothesis-generated distill replies (and issue 15's failing ones) through the
           server path: validation, aggregation, device ledger, report; counts crashes and schema
           violations that reached aggregation (bench/fuzz.py; --set cases=N --set seed=S).
  semisup  no DP, outside the loop: the public-only control vs a FixMatch student on the same public
           data, the accuracy of the fleet's consensus labels against the public teacher's on the same
           rows, and FixMatch with those labels added (bench/semisup.py; --set steps=N).

Suites made of several runs keep each run's folder under runs/; a run whose results.json
exists is not repeated (rerun with --keep to continue an interrupted suite).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path


def environment() -> dict:
    import flwr
    import torch

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "flwr": flwr.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def settings(base: dict) -> dict:
    """A suite's config overrides without the baseline switches: what its rows depend on."""
    return {k: v for k, v in base.items() if not k.startswith("baselines")}


def header(suite: str, overrides: dict) -> dict:
    """What every suite's JSON starts with: its name, the command that reproduces it, the machine."""
    return {"suite": suite,
            "command": f"python -m bench {suite}" + "".join(f" --set {k}={v}" for k, v in overrides.items()),
            "environment": environment()}


def core(out: Path, overrides: dict) -> dict:
    from feddistill.config import load_config
    from feddistill.report import plot_accuracy
    from feddistill.simulations.run import simulate

    cfg = load_config(Path("configs/fashion.toml"), {"output_dir": str(out / "run"), **overrides})
    t0 = time.monotonic()
    results = simulate(cfg)
    seconds = time.monotonic() - t0
    plot_accuracy(results, out / "accuracy.png")
    base = results["baselines"]
    fd_bytes = results["final"]["bytes_per_client_round"]
    summary = {
        **header("core", overrides),
        "config": results["config"],
        "seconds": seconds,
        "feddistill": {"accuracy": results["final"]["student_accuracy"], "bytes_per_client_round": fd_bytes},
        "fedavg": {"accuracy": base["fedavg"]["accuracy"], "bytes_per_client_round": base["fedavg"]["bytes_per_client_round"],
                   "init": base["fedavg"]["init"]},
        "upload_ratio_fedavg_over_feddistill": base["fedavg"]["bytes_per_client_round"] / fd_bytes,
        "accuracy_gap_points": 100 * (base["fedavg"]["accuracy"] - results["final"]["student_accuracy"]),
        "public_teacher_accuracy": base["public_teacher"]["test_accuracy"],
        "public_only_student_accuracy": base["public_only_student"]["test_accuracy"],
        "local_only_accuracy": base.get("local_only", {}).get("accuracy_mean"),
        "centralized_accuracy": base.get("centralized", {}).get("accuracy"),
    }
    (out / "core.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_variant(out: Path, name: str, overrides: dict, baselines: bool = False) -> dict:
    """One simulated run of the Fashion fleet with ``overrides``; reused if already finished.
    ``baselines`` runs the ones the overrides leave on (local-only, centralized) after it."""
    from feddistill.config import load_config
    from feddistill.simulations.run import simulate

    run_dir = out / "runs" / name
    done = run_dir / "results.json"
    if done.exists():
        logging.info("%s: reusing %s", name, done)
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run: start it again
    cfg = load_config(Path("configs/fashion.toml"), {**overrides, "output_dir": str(run_dir)})
    logging.info("%s: starting", name)
    t0 = time.monotonic()
    results = simulate(cfg, baselines=baselines)
    results["seconds"] = time.monotonic() - t0
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    logging.info("%s: accuracy %.4f in %.0f s", name, results["final"]["student_accuracy"], results["seconds"])
    return results


ATTACKS = ("label-flip", "random", "scaled", "nan", "wrong-shape")
FINITE_ATTACKS = ("label-flip", "random")  # valid-looking answers; scaled/NaN/wrong shapes fail validation
NO_BASELINES = {"baselines.local_only": False, "baselines.centralized": False, "baselines.fedavg": False}
EPSILONS = (1.0, 2.0, 4.0, 8.0)
# client-level DP: GNMax votes on few queries per round (a reply's sensitivity is sqrt(|Q|))
GNMAX = {"privacy.client_level": "gnmax", "privacy.bound": "votes", "privacy.delta": 1e-5, "distill.query_size": 10}


def _row(results: dict) -> dict:
    final = results["final"]
    privacy = results.get("privacy") or {}
    return {
        "accuracy": final["student_accuracy"],
        "bytes_per_client_round": final.get("bytes_per_client_round"),
        "rounds_run": len(results["rounds"]),
        "seconds": results.get("seconds"),
        "client_level": privacy.get("client_level"),
        "record_level": privacy.get("record_level"),
        "public_only_student_accuracy": (results.get("public_only_student") or {}).get("test_accuracy"),
        # the private data's gain over the public-only control that went through the same server pipeline
        "public_control_accuracy": final.get("public_control_accuracy"),
        "private_gain": final.get("private_gain"),
        "gap_closed": final.get("gap_closed"),
        "fleet_labelled_rows": final.get("fleet_labelled_rows"),
    }


def privacy(out: Path, overrides: dict) -> dict:
    """Accuracy vs epsilon on the core fleet; DP-FedAvg at the same client-level epsilon, same run."""
    base = {**NO_BASELINES, **overrides}
    record_eps = (1.0, 2.0, 3.0, 4.0, 8.0)  # 3: the Tramer & Boneh centralized DP-SGD reference point
    # Client-level: GNMax votes on few queries per round. The L2 sensitivity of a reply is
    # sqrt(|Q|), so the noise std per vote count grows with the number of queries per round.
    client = {**GNMAX, "distill.query_size": int(base.pop("client_query_size", 10))}
    rows: dict[str, dict] = {"non-private": _row(run_variant(out, "non-private", base))}
    rows["fedavg"] = _row(run_variant(out, "fedavg", {**base, "method": "fedavg"}))
    for eps in EPSILONS:
        rows[f"client-eps{eps:g}"] = _row(run_variant(out, f"client-eps{eps:g}", {**base, **client, "privacy.target_epsilon": eps}))
        rows[f"dp-fedavg-eps{eps:g}"] = _row(run_variant(
            out, f"dp-fedavg-eps{eps:g}", {**base, "method": "dp-fedavg", "privacy.target_epsilon": eps, "privacy.delta": 1e-5}))
    for eps in record_eps:
        rows[f"record-eps{eps:g}"] = _row(run_variant(out, f"record-eps{eps:g}", {
            **base, "privacy.record_level": True, "privacy.record_target_epsilon": eps, "privacy.record_delta": 1e-5}))
    summary = {
        **header("privacy", overrides),
        "rounds": rows["non-private"]["rounds_run"],
        "runs": rows,
        "gap_points_client_eps4_vs_dp_fedavg": 100 * (rows["client-eps4"]["accuracy"] - rows["dp-fedavg-eps4"]["accuracy"]),
        "record_eps3_accuracy": rows["record-eps3"]["accuracy"],
    }
    plot_frontier(rows, record_eps, out / "frontier.png")
    (out / "privacy.json").write_text(json.dumps(summary, indent=2))
    return summary


# The frontier's methods (issue 7): feddistill with each aggregator and privacy unit, and the peers
# a user would pick instead. Flower's (DP-)FedAvg runs twice: from the same public pretraining
# the teacher gets, and from scratch (Flower's strategy as it comes, REFERENCES.md's peer).
FRONTIER_METHODS = {
    "non-private": {},
    "fedavg": {"method": "fedavg"},
    "fedavg-scratch": {"method": "fedavg", "baselines.fedavg_init": "scratch"},
    "client-eps4": {**GNMAX, "privacy.target_epsilon": 4.0},
    "dp-fedavg-eps4": {"method": "dp-fedavg", "privacy.target_epsilon": 4.0, "privacy.delta": 1e-5},
    "dp-fedavg-scratch-eps4": {"method": "dp-fedavg", "privacy.target_epsilon": 4.0, "privacy.delta": 1e-5,
                               "baselines.fedavg_init": "scratch"},
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
            results = run_variant(out, name, {**base, **FRONTIER_METHODS[method], **extra, "fleet.alpha": alpha,
                                              "seed": seed}, baselines=bool(extra))
            runs[name] = {"alpha": alpha, "seed": seed, "method": method, **_row(results)}
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
            cell.update(mean=float(acc.mean()), std=float(acc.std(ddof=1)) if len(acc) > 1 else None,
                        min=float(acc.min()), max=float(acc.max()), n=len(acc))
    # the client-level comparison, paired by seed (same partition and seed in both runs)
    by = {(r["alpha"], r["seed"], r["method"]): r["accuracy"] for r in runs.values()}
    gaps: list[dict] = []
    for peer in ("dp-fedavg-eps4", "dp-fedavg-scratch-eps4"):
        for alpha in sorted({a for a, _, _ in by}, reverse=True):
            points = [100 * (by[(alpha, seed, "client-eps4")] - by[(alpha, seed, peer)])
                      for seed in sorted({s for a, s, _ in by if a == alpha})
                      if (alpha, seed, "client-eps4") in by and (alpha, seed, peer) in by]
            if points:
                gaps.append({"alpha": alpha, "peer": peer, "points_per_seed": points,
                             "mean": float(np.mean(points)), "min": float(np.min(points))})
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

    alphas = sorted(summary["table"], key=lambda a: -float(a[len("alpha"):]))
    methods = [m for m in FRONTIER_METHODS if any(m in summary["table"][a] for a in alphas)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(alphas)
    for i, alpha in enumerate(alphas):
        cells = [summary["table"][alpha].get(m) for m in methods]
        xs = [j + i * width for j in range(len(methods))]
        ax.bar(xs, [c["mean"] if c else 0 for c in cells], width,
               yerr=[[c["mean"] - c["min"] if c else 0 for c in cells], [c["max"] - c["mean"] if c else 0 for c in cells]],
               label=f"Dirichlet alpha = {alpha[len('alpha'):]}", capsize=2)
    ax.set_xticks([j + width * (len(alphas) - 1) / 2 for j in range(len(methods))], methods, rotation=40, ha="right",
                  fontsize=8)
    first = summary["table"][alphas[0]]
    for key, style, label in (("centralized", "k--", "centralized, non-private"),
                              ("public_only", "k:", f"public data alone (round 0), alpha {alphas[0][len('alpha'):]}")):
        if key in first:
            ax.axhline(first[key]["mean"], color=style[0], linestyle=style[1:], linewidth=1, label=label)
    ax.set_ylabel("test accuracy (mean, min-max over seeds)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Fashion-MNIST, 100 clients: feddistill and peers, same fleet and rounds")
    _save(fig, path)


def panel_pair():
    """A figure with two side-by-side panels (headless), for the suites that plot two views."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(12, 4.5))


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_frontier(rows: dict, record_eps: tuple, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(record_eps, [rows[f"record-eps{e:g}"]["accuracy"] for e in record_eps], "o-",
            label="feddistill, record-level DP-SGD on devices (unit: record)")
    ax.plot(EPSILONS, [rows[f"client-eps{e:g}"]["accuracy"] for e in EPSILONS], "s-",
            label="feddistill, client-level GNMax votes (unit: client)")
    ax.plot(EPSILONS, [rows[f"dp-fedavg-eps{e:g}"]["accuracy"] for e in EPSILONS], "^-",
            label="Flower DP-FedAvg (unit: client)")
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
    _save(fig, path)


def faults(out: Path, overrides: dict) -> dict:
    """20 % hostile clients per attack (robust aggregator; plain mean for contrast); 30 % dropouts."""
    base = {**NO_BASELINES, **overrides}
    robust = base.pop("robust_aggregator", "outlier-filtered")
    contrast = [a for a in str(base.pop("mean_contrast", ",".join(FINITE_ATTACKS))).split(",") if a]
    # "non-private" is the privacy suite's clean run: same config, shared when --out points at the same runs
    rows = {"clean-mean": _row(run_variant(out, "non-private", base)),
            f"clean-{robust}": _row(run_variant(out, f"clean-{robust}", {**base, "distill.aggregator": robust}))}
    rows["dropout30-mean"] = _row(run_variant(out, "dropout30-mean", {**base, "scenario.dropout": 0.3}))
    for attack in ATTACKS:
        hostile = {**base, "scenario.hostile_fraction": 0.2, "scenario.attack": attack}
        rows[f"{attack}-{robust}"] = _row(run_variant(out, f"{attack}-{robust}", {**hostile, "distill.aggregator": robust}))
        if attack in contrast:  # only finite attacks reach an aggregator: validation drops the others
            rows[f"{attack}-mean"] = _row(run_variant(out, f"{attack}-mean", hostile))
    for name, results_dir in ((n, out / "runs" / ("non-private" if n == "clean-mean" else n)) for n in rows):
        rounds = json.loads((results_dir / "results.json").read_text())["rounds"]
        rows[name]["dropped_replies"] = sum(sum((r.get("dropped") or {}).values()) if isinstance(r.get("dropped"), dict)
                                            else int(r.get("dropped") or 0) for r in rounds)
    clean = rows[f"clean-{robust}"]["accuracy"]
    summary = {
        **header("faults", overrides),
        "robust_aggregator": robust,
        "rounds": rows["clean-mean"]["rounds_run"],
        "runs": rows,
        "robust_gap_points_vs_clean": {a: 100 * (clean - rows[f"{a}-{robust}"]["accuracy"]) for a in ATTACKS},
        "mean_gap_points_vs_clean": {a: 100 * (rows["clean-mean"]["accuracy"] - rows[f"{a}-mean"]["accuracy"])
                                     for a in contrast},
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
    ax.bar(x - 0.2, [rows.get(f"{a}-mean", {}).get("accuracy", np.nan) for a in attacks], 0.4,
           label="plain mean (where run)")
    ax.bar(x + 0.2, [rows[f"{a}-{robust}"]["accuracy"] for a in attacks], 0.4, label=robust)
    ax.axhline(rows["dropout30-mean"]["accuracy"], color="gray", linestyle=":", label="30 % dropouts (mean)")
    ax.set_xticks(x, attacks)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Fashion-MNIST, 100 clients: 20 % hostile clients per attack")
    _save(fig, path)


def comms(out: Path, overrides: dict) -> dict:
    """Bytes up per client-round vs accuracy for each answer encoding, against FedAvg's model bytes."""
    base = {**NO_BASELINES, **overrides}
    encodings = str(base.pop("encodings", "float16,vote,uint8,float32")).split(",")
    # float16 is the fleet's default: the privacy suite's "non-private" run, shared like "fedavg"
    rows = {dtype: _row(run_variant(out, "non-private" if dtype == "float16" else dtype,
                                    {**base, "distill.answer_dtype": dtype}))
            for dtype in dict.fromkeys(["float16", *encodings])}
    fedavg = _row(run_variant(out, "fedavg", {**base, "method": "fedavg"}))
    for row in rows.values():
        row["fedavg_bytes_over_these"] = fedavg["bytes_per_client_round"] / row["bytes_per_client_round"]
        row["accuracy_cost_points_vs_float16"] = 100 * (rows["float16"]["accuracy"] - row["accuracy"])
    summary = {
        **header("comms", overrides),
        "rounds": fedavg["rounds_run"],
        "fedavg": fedavg,
        "encodings": rows,
    }
    (out / "comms.json").write_text(json.dumps(summary, indent=2))
    return summary


# The 1000-client fleet: 50 private images per client; lighter rounds than the core fleet
# (500 queries, 2 digest epochs, 1 revisit epoch) so that 100 clients per round fit 2 cores.
SCALE = {**NO_BASELINES, "rounds": 10, "distill.query_size": 500, "distill.digest_epochs": 2,
         "distill.revisit_epochs": 1}


def _timed_run(out: Path, name: str, overrides: dict, in_process: bool) -> dict:
    from bench.inprocess import InProcessGrid, TreeRSS
    from feddistill.client.app import make_client_app
    from feddistill.config import load_config
    from feddistill.server.app import run_distillation
    from feddistill.simulations.run import simulate_flower

    run_dir = out / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = load_config(Path("configs/fashion.toml"), {**overrides, "output_dir": str(run_dir)})
    logging.info("%s: starting (%s)", name, "in-process" if in_process else "Flower simulation")
    with TreeRSS() as rss:
        t0 = time.monotonic()
        if in_process:
            results = run_distillation(InProcessGrid(make_client_app(cfg), cfg.fleet.num_clients), cfg)
        else:
            results = simulate_flower(cfg)
        seconds = time.monotonic() - t0
    per_round = [r["seconds"] for r in results["rounds"]]
    row = {
        "clients": cfg.fleet.num_clients,
        "rounds": len(per_round),
        "engine": "in-process loop" if in_process else "Flower simulation (Ray)",
        "wall_seconds": seconds,
        "round_seconds_mean": sum(per_round) / len(per_round),
        "round_seconds": per_round,
        "peak_rss_gib": rss.peak_bytes / 2**30,
        "accuracy": results["final"]["student_accuracy"],
    }
    logging.info("%s: %.0f s, %.1f s/round, peak RSS %.2f GiB", name, seconds, row["round_seconds_mean"],
                 row["peak_rss_gib"])
    return row


def scale(out: Path, overrides: dict) -> dict:
    base = {**SCALE, **overrides}
    sizes = [int(n) for n in str(base.pop("sizes", "10,100,1000")).split(",")]
    if 100 not in sizes:
        raise SystemExit("scale: the overhead ratio is measured at 100 clients; include 100 in --set sizes")
    # --keep: rows of an earlier scale.json with the same settings are kept, only missing sizes run
    earlier = out / "scale.json"
    kept = json.loads(earlier.read_text()) if earlier.is_file() else {}
    rows = dict(kept.get("runs", {})) if kept.get("config") == settings(base) else {}
    # the overhead pair first, then the other sizes; the JSON is rewritten after every run
    plan = [("flower-100", 100, False), ("inprocess-100", 100, True),
            *((f"flower-{n}", n, False) for n in sorted(set(sizes) - {100}))]
    summary = {}
    for name, n, in_process in plan:
        if name not in rows:
            rows[name] = _timed_run(out, name, {**base, "fleet.num_clients": n}, in_process=in_process)
        if "flower-100" in rows and "inprocess-100" in rows:
            summary = _scale_summary(out, overrides, base, rows)
    return summary


def _scale_summary(out: Path, overrides: dict, base: dict, rows: dict) -> dict:
    flower, bare = rows["flower-100"], rows["inprocess-100"]
    summary = {
        **header("scale", overrides),
        "config": settings(base),
        "runs": dict(sorted(rows.items(), key=lambda kv: (kv[1]["clients"], kv[0]))),
        "overhead_ratio_per_round": flower["round_seconds_mean"] / bare["round_seconds_mean"],
        "overhead_ratio_wall": flower["wall_seconds"] / bare["wall_seconds"],
    }
    sizes = sorted(r["clients"] for k, r in rows.items() if k.startswith("flower-"))
    plot_scale(rows, sizes, out / "scale.png")
    (out / "scale.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_scale(rows: dict, sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    a.plot(sizes, [rows[f"flower-{n}"]["round_seconds_mean"] for n in sizes], "o-", label="Flower simulation")
    a.plot([100], [rows["inprocess-100"]["round_seconds_mean"]], "s", label="in-process loop")
    b.plot(sizes, [rows[f"flower-{n}"]["peak_rss_gib"] for n in sizes], "o-")
    for ax, label in ((a, "seconds per round"), (b, "peak RSS, process tree (GiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("clients (10 % per round)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.suptitle("Fashion-MNIST simulation on 2 cores")
    _save(fig, path)


# Where a round's time goes: (function, caller or None for every caller), cumulative CPU time.
# Inference runs under torch.no_grad, whose wrapper hides the caller one level down.
PROFILED = {
    "client: whole message": ("client/app.py:handle_distill", None),
    "client: digest (KD toward the signal on the queries)": ("training.py:train_distill", "client/app.py:handle_distill"),
    "client: revisit (private data, plus KD)": ("training.py:train_revisit", None),
    "client: inference on the queries": ("_contextlib.py:decorate_context", "client/app.py:handle_distill"),
    "client: load/save its state": ("client/state.py:save_state", None),
    "server: distil the global student": ("training.py:train_distill", "server/app.py:distil_student"),
    "server: test and reference inference": ("_contextlib.py:decorate_context", "server/app.py:evaluate_student"),
    "server: release gate": ("server/gate.py:consider", None),
    "server: aggregation and validation": ("strategies/base.py:aggregate_round", None),
    "server: checkpoint": ("server/checkpoint.py:save_checkpoint", None),
}


def profile(out: Path, overrides: dict) -> dict:
    """cProfile (CPU time) of a core-fleet run on the in-process grid: every client and server
    step in one process, so the profile sees the torch work the Flower run does. The fleet's
    data and the public teacher are loaded first, outside the profile: a round's cost is what
    repeats."""
    import cProfile

    from bench.inprocess import InProcessGrid
    from feddistill.client.app import make_client_app
    from feddistill.config import load_config
    from feddistill.server.app import run_distillation, teacher_and_validation
    from feddistill.simulations.fleet import load_fleet

    base = {**NO_BASELINES, "rounds": 3, **overrides}
    cfg = load_config(Path("configs/fashion.toml"), {**base, "output_dir": str(out / "run")})
    # steady state: the public teacher is trained once per setting and then cached; train it
    # (or load it) before the profiler starts
    teacher_and_validation(cfg, load_fleet(cfg.data, cfg.fleet, cfg.seed).splits)
    grid = InProcessGrid(make_client_app(cfg), cfg.fleet.num_clients)
    profiler = cProfile.Profile(time.process_time)
    t0 = time.monotonic()
    profiler.enable()
    results = run_distillation(grid, cfg)
    profiler.disable()
    wall = time.monotonic() - t0
    profiler.dump_stats(out / "profile.pstats")  # for snakeviz / pstats: callers, callees
    summary = {
        **header("profile", overrides),
        "config": settings(base),
        "clients": cfg.fleet.num_clients,
        "rounds": len(results["rounds"]),
        "wall_seconds": wall,
        **summarize_profile(out / "profile.pstats"),
    }
    plot_profile(summary, out / "profile.png")
    (out / "profile.json").write_text(json.dumps(summary, indent=2))
    return summary


def summarize_profile(path: Path) -> dict:
    """The PROFILED buckets and the 20 hottest functions (own time) of a cProfile dump."""
    import pstats

    stats = pstats.Stats(str(path)).stats

    def where(key) -> str:
        filename, line, name = key
        short = filename.split("site-packages/")[-1].split("src/feddistill/")[-1].split("bench/")[-1]
        return f"{short}:{name}" if line else name

    def matches(key, target: str) -> bool:
        return where(key).endswith(target) and target.split(":")[1] == key[2]

    cumulative: dict[str, float] = {}
    for key, (_, _, _, ct, callers) in stats.items():
        for bucket, (target, caller) in PROFILED.items():
            if matches(key, target):
                seconds = ct if caller is None else sum(c[3] for k, c in callers.items() if matches(k, caller))
                cumulative[bucket] = cumulative.get(bucket, 0.0) + seconds
    top_self = sorted(((where(k), v[2]) for k, v in stats.items()), key=lambda kv: -kv[1])[:20]
    return {
        "cpu_seconds": sum(v[2] for v in stats.values()),
        "timer": "time.process_time (CPU time of this process: not inflated by other load)",
        "cumulative_seconds": dict(sorted(cumulative.items(), key=lambda kv: -kv[1])),
        "top_self_seconds": [{"function": f, "seconds": t} for f, t in top_self],
    }


def plot_profile(summary: dict, path: Path) -> None:
    import matplotlib

    from bench.readme import short_function

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    cum = summary["cumulative_seconds"]
    a.barh(list(cum)[::-1], list(cum.values())[::-1])
    a.set_xlabel("cumulative CPU seconds")
    a.set_title(f"{summary['rounds']} rounds, {summary['clients']} clients: {summary['cpu_seconds']:.0f} CPU s in all",
                fontsize=9)
    top = summary["top_self_seconds"][:12]
    b.barh([short_function(t["function"])[-45:] for t in top][::-1], [t["seconds"] for t in top][::-1], color="tab:orange")
    b.set_xlabel("self CPU seconds")
    b.set_title("hottest functions (own time)", fontsize=9)
    for ax in (a, b):
        ax.tick_params(axis="y", labelsize=7)
    _save(fig, path)


AUDIT_RUNS = {
    "non-private": {},
    "record-eps8": {"privacy.record_level": True, "privacy.record_target_epsilon": 8.0},
    "record-eps2": {"privacy.record_level": True, "privacy.record_target_epsilon": 2.0},
    "client-gnmax-eps4": {"privacy.client_level": "gnmax", "privacy.bound": "votes", "privacy.target_epsilon": 4.0,
                          "distill.query_size": 20},
}


def _audited(out: Path, name: str, config: str, overrides: dict) -> tuple[dict, dict]:
    from feddistill.config import load_config
    from feddistill.privacy.audit.runner import run_audit
    from feddistill.simulations.run import simulate

    run_dir = out / "runs" / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = load_config(Path(config), {**NO_BASELINES, "audit.keep_artifacts": True, **overrides,
                                     "output_dir": str(run_dir)})
    t0 = time.monotonic()
    results = simulate(cfg, baselines=False)
    run_seconds = time.monotonic() - t0
    logging.info("%s: run %.0f s, auditing", name, run_seconds)
    audit, code = run_audit(run_dir)
    return results, {"run_seconds": run_seconds, "audit_seconds": audit["timings_s"]["total"],
                     "timings_s": audit["timings_s"], "exit_code": code, "audit": audit}


def _audit_rows(audit: dict) -> dict:
    rows = {}
    for name, t in audit["targets"].items():
        if t.get("skipped"):
            rows[name] = {"skipped": t["reason"]}
            continue
        best = t["attacks"][t["best_auc_attack"]]["summary"]
        claim = t.get("claimed")
        rows[name] = {
            "best_attack": t["best_auc_attack"],
            "auc": best["auc"],
            "tpr_at_1pct_fpr": best["tpr_at_fpr"]["0.01"]["tpr"],
            "tpr_at_0.1pct_fpr": best["tpr_at_fpr"]["0.001"]["tpr"],
            "empirical_epsilon_lower_bound": t["epsilon_lower_bound"],
            "claimed_epsilon": None if not claim else claim["epsilon"],
            "claimed_unit": None if not claim else claim.get("unit"),
        }
    return rows


def audit(out: Path, overrides: dict) -> dict:
    runs = {}
    for name, extra in AUDIT_RUNS.items():
        results, timing = _audited(out, name, "configs/digits.toml", {**extra, **overrides})
        runs[name] = {
            "accuracy": results["final"]["student_accuracy"],
            "run_seconds": timing["run_seconds"],
            "audit_seconds": timing["audit_seconds"],
            "verdict_exit_code": timing["exit_code"],
            "dp_violations": len(timing["audit"]["dp_violations"]),
            "canary_audit": {k: {"epsilon_lower_bound": v["epsilon_lower_bound"], "claimed": v["claimed"]}
                             for k, v in ((timing["audit"].get("canary_audit") or {}).get("results") or {}).items()},
            "targets": _audit_rows(timing["audit"]),
        }
    # The audit's cost on a Fashion-MNIST run of the core fleet (3 rounds keep it short; the
    # audit's work grows with the clients audited and reference models, not with rounds).
    _, fashion = _audited(out, "fashion-3rounds", "configs/fashion.toml",
                          {"rounds": 3, "audit.canaries": 100, **overrides})
    summary = {
        **header("audit", overrides),
        "options": "defaults of `feddistill audit` (4 reference models, 2 target clients)",
        "digits": runs,
        "audit_seconds": {"digits quick start (non-private)": runs["non-private"]["audit_seconds"],
                          "fashion-mnist (100 clients, 3 rounds)": fashion["audit_seconds"]},
        "fashion_timings_s": fashion["timings_s"],
        "fashion_targets": _audit_rows(fashion["audit"]),
    }
    (out / "audit.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


DEPLOY_RUN = {"rounds": 5, "fleet.num_clients": 3, "fleet.fraction": 1.0, "baselines.local_only": False,
              "baselines.centralized": False, "baselines.fedavg": False, "teacher.epochs": 60,
              "audit.keep_artifacts": False, "audit.canaries": 0}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def deploy(out: Path, overrides: dict) -> dict:
    import subprocess
    import sys
    import threading

    from bench.inprocess import tree_rss
    from feddistill.config import load_config
    from feddistill.deploy.local import LocalDeployment
    from feddistill.simulations.run import simulate_flower

    run = {**DEPLOY_RUN, **overrides}
    cfg = load_config(Path("configs/digits.toml"), {**run, "output_dir": str(out / "simulation")})
    t0 = time.monotonic()
    sim = simulate_flower(cfg)
    sim_seconds = time.monotonic() - t0
    # the same run with the answers summed by Flower's SecAgg+ (3 shares, any 2 reconstruct)
    secagg_cfg = load_config(Path("configs/digits.toml"), {
        **run, "distill.secure_aggregation": "secagg+", "distill.secagg_num_shares": 3,
        "distill.secagg_reconstruction_threshold": 2, "output_dir": str(out / "simulation-secagg")})
    t0 = time.monotonic()
    secagg = simulate_flower(secagg_cfg)
    secagg_seconds = time.monotonic() - t0

    peaks: dict[int, int] = {}
    stop = threading.Event()
    with LocalDeployment(out / "deployment", num_supernodes=3, config={k: v for k, v in run.items() if k != "rounds"}) as dep:
        dep.start()

        def sample() -> None:
            while not stop.is_set():
                for i, proc in dep.supernodes.items():
                    peaks[i] = max(peaks.get(i, 0), tree_rss(proc.popen.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        deployed = dep.run(rounds=run["rounds"], output_dir=out / "deployment" / "run", timeout_s=900)
        dep_seconds = time.monotonic() - t0
        stop.set()
        sampler.join()

    def per_round(results: dict) -> list[float]:
        return [r["seconds"] for r in results["rounds"]]

    imports = []
    for _ in range(3):  # a SuperNode starts a fresh ClientApp process per message: this is its import cost
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "import feddistill.client.app"], check=True)
        imports.append(time.monotonic() - t0)
    site = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    sizes = {d.name: _du(d) for d in site.iterdir() if d.is_dir() and not d.name.endswith((".dist-info", "__pycache__"))}
    biggest = dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:8])
    summary = {
        **header("deploy", overrides),
        "run": run,
        "simulation": {"wall_seconds": sim_seconds, "round_seconds": per_round(sim),
                       "round_seconds_mean": sum(per_round(sim)) / len(per_round(sim))},
        "simulation_secagg": {"wall_seconds": secagg_seconds, "round_seconds": per_round(secagg),
                              "round_seconds_mean": sum(per_round(secagg)) / len(per_round(secagg)),
                              "bytes_per_client_round": secagg["final"]["bytes_per_client_round"],
                              "accuracy": secagg["final"]["student_accuracy"]},
        "simulation_bytes_per_client_round": sim["final"]["bytes_per_client_round"],
        "deployment": {"wall_seconds": dep_seconds, "round_seconds": per_round(deployed),
                       "round_seconds_mean": sum(per_round(deployed)) / len(per_round(deployed)),
                       "transport": "gRPC over TLS on 127.0.0.1, SuperNode authentication on"},
        "client_footprint": {
            "supernode_peak_rss_mib": {str(i): v / 2**20 for i, v in sorted(peaks.items())},
            "clientapp_import_seconds": imports,
            "venv_site_packages_mib": _du(site) / 2**20,
            "largest_packages_mib": {k: v / 2**20 for k, v in biggest.items()},
        },
    }
    (out / "deploy.json").write_text(json.dumps(summary, indent=2))
    return summary


def ceiling(out: Path, overrides: dict) -> dict:
    from bench.ceiling import ceiling as run_ceiling

    return run_ceiling(out, overrides)


def fuzz(out: Path, overrides: dict) -> dict:
    from bench.fuzz import fuzz as run_fuzz

    return run_fuzz(out, overrides)


def semisup(out: Path, overrides: dict) -> dict:
    from bench.semisup import semisup as run_semisup

    return run_semisup(out, overrides)


def headline(out: Path, overrides: dict) -> dict:
    from bench.headline import headline as run_headline

    return run_headline(out, overrides)


SUITES = {"headline": headline, "core": core, "audit": audit, "deploy": deploy, "privacy": privacy, "faults": faults, "comms": comms, "scale": scale,
          "frontier": frontier, "profile": profile, "ceiling": ceiling, "fuzz": fuzz, "semisup": semisup}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("suite", choices=sorted([*SUITES, "readme"]),
                        help="a suite, or `readme`: rewrite the README's tables from bench/results/*/*.json")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (TOML value)")
    parser.add_argument("--keep", action="store_true", help="keep finished runs of an interrupted suite")
    args = parser.parse_args()
    if args.suite == "readme":
        from bench.readme import update

        print("README blocks written:", ", ".join(update()) or "none")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from flwr.supercore.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)
    FLOWER_LOGGER.propagate = False
    from feddistill.cli import _parse_override

    overrides = dict(_parse_override(s) for s in args.set)
    out = args.out or Path("bench/results") / args.suite
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(SUITES[args.suite](out, overrides), indent=2))


if __name__ == "__main__":
    main()
