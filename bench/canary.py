"""`python -m bench canary`: the deployment audit's epsilon estimate, calibrated.

Two fleets on digits, every client every round (q = 1, so the claim is a plain composition of
Gaussian mechanisms: exactly mu-GDP, mu = sqrt(rounds) / z), 5 rounds, run in process on the
production ServerApp and ClientApp code (bench/inprocess.py):

- **calibration**: 12 honest clients + 128 audit slots (16 canaries each). The estimate's
  interval in mu shrinks like sqrt(2 / audit nodes) (feddistill.privacy.audit.canary_clients),
  so the calibration needs many audit nodes; they train nothing, so they are cheap. Client-level
  central DP at epsilon 1, 4 and 16, no DP, and a deliberately broken run (the server adds no
  noise while its ledger still claims epsilon = 1). Each run is audited with
  `feddistill audit-deployment`'s code from its released signals and the officer's secret
  only; the same statistics are also estimated from the first 4, 8, ... of the audit nodes (the
  officer auditing fewer nodes), and, for calibration only, from the Gaussian mechanism's output
  before the mean aggregator clips and renormalises it (kept by the bench, never released).
- **cost**: the realistic fleet, 12 honest clients + 4 audit slots: accuracy with the 4 slots
  answering honestly (no audit) vs answering canaries, without DP and at epsilon 16.

``--set seeds=N`` repeats every calibration run over N seeds (default 6), ``--set cost_seeds=N``
every cost run (default 4); ``--set slots=N`` audit slots of the calibration fleet (at most 128:
digits' private pool cannot give more Dirichlet partitions at least one example each);
``--set rounds=R``. About 20 minutes on one core.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import NO_BASELINES, header, save_figure

HONEST, CANARIES = 12, 16
COST_SLOTS, CALIBRATION_SLOTS = 4, 128
SUBSETS = (4, 8, 16, 32, 64, 128)  # audit nodes the officer audits, first n of the calibration slots
DP = ("eps1", "eps4", "eps16")
CENTRAL = {"privacy.client_level": "central"}
CALIBRATION = {  # name -> (privacy overrides, broken: server noise off)
    "eps1": ({**CENTRAL, "privacy.target_epsilon": 1.0}, False),
    "eps4": ({**CENTRAL, "privacy.target_epsilon": 4.0}, False),
    "eps16": ({**CENTRAL, "privacy.target_epsilon": 16.0}, False),
    "no-dp": ({}, False),
    "broken-eps1": ({**CENTRAL, "privacy.target_epsilon": 1.0}, True),
}
COST = {  # name -> (privacy overrides, audit slots answer canaries)
    "no-dp": ({}, True),
    "eps16": ({**CENTRAL, "privacy.target_epsilon": 16.0}, True),
    "no-dp-no-audit": ({}, False),
    "eps16-no-audit": ({**CENTRAL, "privacy.target_epsilon": 16.0}, False),
}
Z95 = 1.959963984540054


def _config(run_dir: Path, privacy: dict, slots: int, rounds: int, seed: int):
    from feddistill.config import load_config

    return load_config(
        None,
        {
            **NO_BASELINES,
            "seed": seed,
            "rounds": rounds,
            "fleet.num_clients": HONEST + slots,
            "fleet.fraction": 1.0,
            "distill.digest_epochs": 5,
            "distill.revisit_epochs": 2,
            "privacy.noise_source": "os-entropy",
            **privacy,
            "output_dir": str(run_dir),
        },
    )


class _Recorder:
    """Calibration only: keeps every round's output of the Gaussian mechanism (the noisy mean)
    before the mean aggregator clips and renormalises it into the released signal."""

    def __init__(self, inner: Any):
        self.inner, self.raw = inner, []

    def aggregate_answers(self, answers: np.ndarray, weights: np.ndarray) -> np.ndarray:
        self.raw.append(np.array(answers[0], dtype=np.float64))
        return self.inner.aggregate_answers(answers, weights)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _run(run_dir: Path, privacy: dict, slots: int, canaries: bool, broken: bool, rounds: int, seed: int):
    """One in-process run; the audit slots (the last partition ids) answer canaries when asked.
    Returns its results and, under central DP, every round's noisy mean before post-processing."""
    from bench.inprocess import InProcessGrid
    from feddistill.client.app import make_client_app
    from feddistill.client.canary import CANARIES_KEY, SECRET_KEY
    from feddistill.server.loop import DistillationRun
    from feddistill.strategies.dp import CentralGaussianAnswers

    recorder: list[_Recorder] = []

    class CalibrationRun(DistillationRun):
        def _plan_privacy(self) -> None:
            super()._plan_privacy()
            if isinstance(self.strategy, CentralGaussianAnswers):
                self.strategy.inner = _Recorder(self.strategy.inner)
                recorder.append(self.strategy.inner)
                if broken:  # the fault the audit must catch: the ledger accounts noise the server never adds
                    self.strategy.noise_std = 0.0

    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    cfg = _config(run_dir, privacy, slots, rounds, seed)
    grid = InProcessGrid(make_client_app(cfg), cfg.fleet.num_clients)
    audit_config = {SECRET_KEY: str(_secret(run_dir.parent)), CANARIES_KEY: CANARIES}
    for pid in _slots(slots) if canaries else []:
        grid._contexts[1000 + pid].node_config.update(audit_config)
    results = CalibrationRun(grid, cfg).run()
    return results, (recorder[0].raw if recorder else None)


def _slots(slots: int) -> list[int]:
    return list(range(HONEST, HONEST + slots))


def _secret(folder: Path) -> Path:
    path = folder / "officer.secret"
    if not path.is_file():
        import secrets

        path.write_text(secrets.token_hex(32) + "\n")
    return path


def _mu(est: dict) -> dict:
    return {
        "mu_client": est["mu_client"],
        "mu_client_interval": est["mu_client_interval"],
        "mu_client_se": est["mu_client_se"],
    }


def _extra_estimates(run_dir: Path, raw: list[np.ndarray] | None, slots: int, delta: float) -> dict:
    """The release's estimate from the first n audit nodes (n in SUBSETS), and the estimate from
    the noisy means before post-processing (calibration only)."""
    from feddistill.client.canary import read_secret
    from feddistill.privacy.audit.canary_clients import canary_statistics, estimate_from_canaries
    from feddistill.privacy.audit.deployment import load_released

    secret, nodes = read_secret(_secret(run_dir.parent)), _slots(slots)
    released = load_released(run_dir)
    st = canary_statistics(released, secret, nodes, CANARIES)
    generated = [-(i + 1) for i in range(16)]
    out: dict[str, Any] = {
        "by_slots": {
            str(n): _mu(estimate_from_canaries(st.subset(nodes[:n] + generated), delta)) for n in SUBSETS if n <= slots
        }
    }
    if raw is not None:
        if len(raw) != len(released):
            raise RuntimeError(f"{run_dir}: {len(raw)} noisy means kept for {len(released)} released rounds")
        gaussian = {rnd: (q, m) for (rnd, (q, _)), m in zip(sorted(released.items()), raw, strict=True)}
        out["before_post_processing"] = _mu(
            estimate_from_canaries(canary_statistics(gaussian, secret, nodes, CANARIES), delta)
        )
    return out


def _row(run_dir: Path, results: dict, slots: int, audited: bool, raw: list[np.ndarray] | None = None) -> dict:
    from feddistill.privacy.audit.deployment import run_deployment_audit

    claim = (results["privacy"] or {}).get("client_level")
    row: dict[str, Any] = {
        "accuracy": results["final"]["student_accuracy"],
        "claimed_epsilon": None if claim is None else claim["epsilon"],
        "noise_std": None if claim is None else claim["noise_std"],
    }
    if not audited:
        return row
    t0 = time.monotonic()
    audit, code = run_deployment_audit(run_dir, _secret(run_dir.parent), _slots(slots), canaries=CANARIES)
    est = audit["estimate"]
    bounds = {b["source"]: b["epsilon_lower_bound"] for b in audit["epsilon_lower_bounds"]}
    row |= {
        "claimed_mu": audit["claimed_mu"],
        "estimated_epsilon": est["epsilon_estimate"],
        "estimate_interval": est["epsilon_estimate_interval"],
        **_mu(est),
        "epsilon_per_canary": est["epsilon_estimate_per_canary"],
        "lower_bounds": bounds,
        "lower_bound": max(bounds.values(), default=0.0),
        "violation": bool(audit["dp_violations"]),
        "exit_code": code,
        "inserted": est["inserted"]["n"],
        "held_out": est["held_out"],
        "generated": est["generated"],
        "audit_seconds": time.monotonic() - t0,
    }
    if slots > COST_SLOTS:
        row |= _extra_estimates(run_dir, raw, slots, est["delta"])
    return row


def _fleet(out: Path, fleet: str, settings: dict, slots: int, seeds: int, rounds: int) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for name, (privacy, flag) in settings.items():
        audited, broken = (flag, False) if fleet == "cost" else (True, flag)
        for seed in range(seeds):
            run_dir = out / "runs" / f"{fleet}-{name}-seed{seed}"
            t0 = time.monotonic()
            results, raw = _run(run_dir, privacy, slots, audited, broken, rounds, seed)
            seconds = time.monotonic() - t0
            runs.setdefault(name, []).append({**_row(run_dir, results, slots, audited, raw), "run_seconds": seconds})
            shown = {k: v for k, v in runs[name][-1].items() if k not in ("lower_bounds", "by_slots")}
            logging.info("%s %s seed %d: %s", fleet, name, seed, shown)
    return runs


def canary(out: Path, overrides: dict) -> dict:
    rounds, seeds = int(overrides.get("rounds", 5)), int(overrides.get("seeds", 6))
    cost_seeds, slots = int(overrides.get("cost_seeds", 4)), int(overrides.get("slots", CALIBRATION_SLOTS))
    t0 = time.monotonic()
    calibration = _fleet(out, "calibration", CALIBRATION, slots, seeds, rounds)
    cost = _fleet(out, "cost", COST, COST_SLOTS, cost_seeds, rounds)
    summary = {
        **header("canary", overrides),
        "calibration_fleet": f"digits, {HONEST} honest clients + {slots} audit slots x {CANARIES} canaries, q=1",
        "cost_fleet": f"digits, {HONEST} honest clients + {COST_SLOTS} audit slots x {CANARIES} canaries, q=1",
        "slots": slots,
        "rounds": rounds,
        "seeds": seeds,
        "cost_seeds": cost_seeds,
        "delta": 1e-5,
        "calibration": calibration,
        "cost": cost,
        "pooled": {name: _pooled(calibration[name]) for name in DP},
        "half_width_by_slots": _half_widths(calibration),
        "checks": _checks(calibration, cost),
        "wall_seconds": time.monotonic() - t0,
    }
    (out / "canary.json").write_text(json.dumps(summary, indent=2))
    _plot(summary, out / "canary.png")
    shutil.rmtree(out / "runs")  # run folders of in-process runs (no baselines): the JSON keeps what counts
    return summary


def _pool(estimates: list[dict]) -> dict:
    """Inverse-variance pool of independent estimates of the same mu (the seeds of one setting:
    the same mechanism, z and rounds), with its 95 % normal interval."""
    weights = np.array([1 / e["mu_client_se"] ** 2 for e in estimates])
    mu = float(np.dot(weights, [e["mu_client"] for e in estimates]) / weights.sum())
    se = float(1 / math.sqrt(weights.sum()))
    return {"mu_client": mu, "mu_client_se": se, "mu_client_interval": [mu - Z95 * se, mu + Z95 * se]}


def _pooled(rows: list[dict]) -> dict:
    pooled = {"claimed_mu": rows[0]["claimed_mu"], "claimed_epsilon": rows[0]["claimed_epsilon"]}
    pooled["release"] = _pool(rows)
    if all("before_post_processing" in r for r in rows):
        pooled["before_post_processing"] = _pool([r["before_post_processing"] for r in rows])
    return pooled


def _half_widths(calibration: dict[str, list[dict]]) -> dict[str, float]:
    """Mean half-width in mu of the release's 95 % interval over every DP run, by audit nodes audited."""
    widths: dict[str, list[float]] = {}
    for name in DP:
        for r in calibration[name]:
            for n, est in r.get("by_slots", {}).items():
                low, high = est["mu_client_interval"]
                widths.setdefault(n, []).append((high - low) / 2)
    return {n: float(np.mean(w)) for n, w in widths.items()}


def _inside(claim: float, interval: list[float]) -> bool:
    return interval[0] <= claim <= interval[1]


def _checks(calibration: dict[str, list[dict]], cost: dict[str, list[dict]]) -> dict:
    """What the issue asks of the estimator, measured."""
    honest = [r for name in DP for r in calibration[name]]
    audited_dp = honest + cost["eps16"]
    pooled = {name: _pooled(calibration[name]) for name in DP}
    release = [pooled[name]["release"]["mu_client"] for name in DP]
    checks: dict[str, Any] = {
        "lower_bound_never_above_claim": all(r["lower_bound"] <= r["claimed_epsilon"] for r in audited_dp),
        "audited_dp_runs": len(audited_dp),
        "claim_inside_estimate_interval": sum(_inside(r["claimed_mu"], r["mu_client_interval"]) for r in honest),
        "honest_runs": len(honest),
        "estimate_tracks_claim": bool(all(a < b for a, b in zip(release, release[1:]))),
        "estimate_not_above_claim_pooled": all(
            pooled[name]["release"]["mu_client_interval"][0] <= pooled[name]["claimed_mu"] for name in DP
        ),
        "broken_flagged": all(r["violation"] and r["exit_code"] == 1 for r in calibration["broken-eps1"]),
    }
    if all("before_post_processing" in pooled[name] for name in DP):
        gaussian = [pooled[name]["before_post_processing"] for name in DP]
        checks["before_post_processing_tracks_claim"] = bool(
            all(a["mu_client"] < b["mu_client"] for a, b in zip(gaussian, gaussian[1:]))
        )
        checks["claim_inside_estimate_interval_before_post_processing"] = sum(
            _inside(r["claimed_mu"], r["before_post_processing"]["mu_client_interval"]) for r in honest
        )
        checks["claim_inside_pooled_interval_before_post_processing"] = sum(
            _inside(pooled[name]["claimed_mu"], pooled[name]["before_post_processing"]["mu_client_interval"])
            for name in DP
        )
    return checks


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.6))
    pooled = summary["pooled"]
    claims = [pooled[name]["claimed_mu"] for name in DP]
    for i, (key, label) in enumerate(
        (("release", "released signal (what the officer audits)"), ("before_post_processing", "Gaussian output"))
    ):
        if not all(key in pooled[name] for name in DP):
            continue
        est = [pooled[name][key] for name in DP]
        x = [c * (1 + 0.04 * (2 * i - 1)) for c in claims]
        y = [e["mu_client"] for e in est]
        err = [
            [e["mu_client"] - e["mu_client_interval"][0] for e in est],
            [e["mu_client_interval"][1] - e["mu_client"] for e in est],
        ]
        left.errorbar(x, y, yerr=err, fmt="o", capsize=3, color=f"C{i}", label=f"{label}, seeds pooled")
        for name in DP:
            for r in summary["calibration"][name]:
                v = r if key == "release" else r[key]
                left.scatter(
                    r["claimed_mu"] * (1 + 0.04 * (2 * i - 1)), v["mu_client"], color=f"C{i}", alpha=0.35, s=12
                )
    top = max(claims) * 1.3
    left.plot([0, top], [0, top], color="grey", ls=":", label="estimate = claim")
    left.set_xticks(claims, [f"{c:.2f}\n(ε {pooled[name]['claimed_epsilon']:.0f})" for name, c in zip(DP, claims)])
    left.set_xlabel("claimed client-level mu (mu-GDP of the run's Gaussians, q = 1)")
    left.set_ylabel("estimated mu [95 % interval]; dots: single seeds")
    left.set_title(f"estimate vs claim, {summary['slots']} audit slots", fontsize=9)
    left.legend(fontsize=7, loc="upper left")
    widths = summary["half_width_by_slots"]
    n = np.array([int(k) for k in widths])
    w = np.array(list(widths.values()))
    right.loglog(n, w, "o-", label="measured (mean over DP runs)")
    right.loglog(n, w[-1] * np.sqrt(n[-1] / n), ":", color="grey", label="∝ sqrt(2 / audit nodes)")
    right.set_xlabel("audit nodes audited")
    right.set_ylabel("95 % half-width in mu")
    right.set_title("precision vs audit nodes", fontsize=9)
    right.legend(fontsize=8)
    save_figure(fig, path)
