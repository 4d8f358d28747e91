"""`python -m bench canary`: the deployment audit's epsilon estimate, calibrated.

Digits, 12 honest clients + 4 audit slots (16 canaries each), every client every round (q = 1,
so the claim is a plain composition of Gaussian mechanisms), 5 rounds, run in process on the
production ServerApp and ClientApp code (bench/inprocess.py). Client-level central DP at
epsilon 1, 4 and 16, and no DP; and a deliberately broken run: the server adds no noise while
its ledger still claims epsilon = 1. Each run is audited with `feddistill audit-deployment`'s
code from its released signals and the officer's secret only. The cost: the same fleet with
the 4 slots answering honestly (no audit) vs answering canaries, without DP and at epsilon 16.

``--set seeds=N`` repeats every run over N seeds (default 1); ``--set rounds=R``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from bench.common import NO_BASELINES, header, save_figure

HONEST, AUDIT_SLOTS, CANARIES = 12, 4, 16
SETTINGS = {  # name -> (privacy overrides, audit slots answer canaries, broken: server noise off)
    "no-dp": ({}, True, False),
    "eps16": ({"privacy.client_level": "central", "privacy.target_epsilon": 16.0}, True, False),
    "eps4": ({"privacy.client_level": "central", "privacy.target_epsilon": 4.0}, True, False),
    "eps1": ({"privacy.client_level": "central", "privacy.target_epsilon": 1.0}, True, False),
    "broken-eps1": ({"privacy.client_level": "central", "privacy.target_epsilon": 1.0}, True, True),
    "no-dp-no-audit": ({}, False, False),
    "eps16-no-audit": ({"privacy.client_level": "central", "privacy.target_epsilon": 16.0}, False, False),
}


def _config(run_dir: Path, privacy: dict, rounds: int, seed: int):
    from feddistill.config import load_config

    return load_config(
        None,
        {
            **NO_BASELINES,
            "seed": seed,
            "rounds": rounds,
            "fleet.num_clients": HONEST + AUDIT_SLOTS,
            "fleet.fraction": 1.0,
            "distill.digest_epochs": 5,
            "distill.revisit_epochs": 2,
            "privacy.noise_source": "os-entropy",
            **privacy,
            "output_dir": str(run_dir),
        },
    )


def _run(run_dir: Path, privacy: dict, canaries: bool, broken: bool, rounds: int, seed: int) -> dict:
    """One in-process run; the audit slots (the last partition ids) answer canaries when asked."""
    from bench.inprocess import InProcessGrid
    from feddistill.client.app import make_client_app
    from feddistill.client.canary import CANARIES_KEY, SECRET_KEY
    from feddistill.server.loop import DistillationRun

    class BrokenRun(DistillationRun):
        """The fault the audit must catch: the ledger accounts noise the server never adds."""

        def _plan_privacy(self) -> None:
            super()._plan_privacy()
            self.strategy.noise_std = 0.0  # CentralGaussianAnswers: the noise switched off

    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg = _config(run_dir, privacy, rounds, seed)
    grid = InProcessGrid(make_client_app(cfg), cfg.fleet.num_clients)
    audit_config = {SECRET_KEY: str(_secret(run_dir.parent)), CANARIES_KEY: CANARIES}
    for pid in _slots() if canaries else []:
        grid._contexts[1000 + pid].node_config.update(audit_config)
    return (BrokenRun if broken else DistillationRun)(grid, cfg).run()


def _slots() -> list[int]:
    return list(range(HONEST, HONEST + AUDIT_SLOTS))


def _secret(folder: Path) -> Path:
    path = folder / "officer.secret"
    if not path.is_file():
        import secrets

        path.write_text(secrets.token_hex(32) + "\n")
    return path


def _row(run_dir: Path, results: dict, audited: bool) -> dict:
    from feddistill.privacy.audit.deployment import run_deployment_audit

    claim = (results["privacy"] or {}).get("client_level")
    row = {
        "accuracy": results["final"]["student_accuracy"],
        "claimed_epsilon": None if claim is None else claim["epsilon"],
        "noise_std": None if claim is None else claim["noise_std"],
    }
    if not audited:
        return row
    audit, code = run_deployment_audit(run_dir, _secret(run_dir.parent), _slots(), canaries=CANARIES)
    est = audit["estimate"]
    bounds = {b["source"]: b["epsilon_lower_bound"] for b in audit["epsilon_lower_bounds"]}
    return {
        **row,
        "estimated_epsilon": est["epsilon_estimate"],
        "estimate_interval": est["epsilon_estimate_interval"],
        "mu_client": est["mu_client"],
        "mu_client_interval": est["mu_client_interval"],
        "epsilon_per_canary": est["epsilon_estimate_per_canary"],
        "lower_bounds": bounds,
        "lower_bound": max(bounds.values(), default=0.0),
        "violation": bool(audit["dp_violations"]),
        "exit_code": code,
        "inserted": est["inserted"]["n"],
        "held_out": est["held_out"],
        "generated": est["generated"],
    }


def canary(out: Path, overrides: dict) -> dict:
    rounds, seeds = int(overrides.get("rounds", 5)), int(overrides.get("seeds", 1))
    runs: dict[str, list[dict]] = {}
    for name, (privacy, audited, broken) in SETTINGS.items():
        for seed in range(seeds):
            run_dir = out / "runs" / f"{name}-seed{seed}"
            results = _run(run_dir, privacy, audited, broken, rounds, seed)
            runs.setdefault(name, []).append(_row(run_dir, results, audited))
            logging.info("%s seed %d: %s", name, seed, {k: v for k, v in runs[name][-1].items() if k != "lower_bounds"})
    summary = {
        **header("canary", overrides),
        "fleet": f"digits, {HONEST} honest clients + {AUDIT_SLOTS} audit slots x {CANARIES} canaries, q=1",
        "rounds": rounds,
        "seeds": seeds,
        "delta": 1e-5,
        "runs": runs,
        "checks": _checks(runs),
    }
    (out / "canary.json").write_text(json.dumps(summary, indent=2))
    _plot(runs, out / "canary.png")
    shutil.rmtree(out / "runs")  # run folders of in-process runs (no baselines): the JSON keeps what counts
    return summary


def _checks(runs: dict[str, list[dict]]) -> dict:
    """What the issue asks of the estimator, measured."""
    honest = [r for name in ("eps1", "eps4", "eps16") for r in runs[name]]
    return {
        "lower_bound_never_above_claim": all(r["lower_bound"] <= r["claimed_epsilon"] for r in honest),
        "claim_inside_estimate_interval": sum(
            (r["estimate_interval"][0] or 0) <= r["claimed_epsilon"] <= (r["estimate_interval"][1] or math.inf)
            for r in honest
        ),
        "honest_runs": len(honest),
        "broken_flagged": all(r["violation"] and r["exit_code"] == 1 for r in runs["broken-eps1"]),
    }


def _shown(value: float | None, cap: float) -> float:
    """An epsilon on the plot's log axis: None (unbounded) at the cap, 0 at the floor."""
    return cap if value is None else min(max(value, 0.05), cap)


def _plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    cap = 200.0
    for i, name in enumerate(("eps1", "eps4", "eps16", "broken-eps1", "no-dp")):
        for r in runs[name]:
            x = r["claimed_epsilon"] or cap
            y, low, high = (_shown(v, cap) for v in (r["estimated_epsilon"], *r["estimate_interval"]))
            ax.errorbar(
                x * (1 + 0.03 * i), y, yerr=[[y - low], [high - y]], fmt="o", capsize=3, color=f"C{i}", label=name
            )
            ax.scatter(x * (1 + 0.03 * i), _shown(r["lower_bound"], cap), marker="v", color="black")
    ax.plot([0.5, cap], [0.5, cap], color="grey", ls=":", label="estimate = claim")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"claimed client-level ε (no DP plotted at {cap:g})")
    ax.set_ylabel("estimated ε [95 % interval]; ▼ lower bound")
    ax.set_title(f"canary clients: estimate vs claim (unbounded shown at {cap:g})", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    save_figure(fig, path)
