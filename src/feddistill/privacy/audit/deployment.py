"""`feddistill audit-deployment RUN_DIR --secret FILE --audit-node ID ...`: the privacy officer's
audit of a real deployment.

``feddistill audit`` needs what only a simulation has (the kept uploads, every local student,
the membership ground truth). A deployed fleet's officer has the server's run folder and their
own secret, nothing else, and this is what they can measure with it:

Who holds what
--------------
- **Server operator**: the run folder (results.json with the claimed client-level epsilon,
  ``released/roundNNNN.npz``: every round's released teacher signal, the released students).
  Learns which nodes took part and their (noised, or SecAgg-summed) answers, as in any run; it
  cannot tell an audit node from a device with noisy answers, and learns no canary.
- **Privacy officer**: the secret (``openssl rand -hex 32``) and which node ids are audit
  SuperNodes (started with ``audit-canary-secret`` in their node config). Learns the canaries'
  statistics and the epsilon estimate, from the released signals only; no device's data.
- **Devices**: their private data and ledgers, as always; they learn nothing about the audit.

Threat model: **every round's released teacher signal** (the aggregate on that round's queries
after the server's DP noise; what the client-level ledger accounts). The released students are
post-processing of those signals and public data, so they cannot leak more; auditing the
final release only would give a weaker (lower) estimate.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from feddistill.client.canary import CanaryError, read_secret
from feddistill.client.record_canaries import load_record_canaries
from feddistill.models import build_model
from feddistill.runfolder import ResultsFormatError, RunFolder, RunResults, read_results

from .artifacts import AuditInputError, _load_model_file
from .attacks import loss_scores
from .canary_clients import canary_statistics, claimed_mu, estimate_from_canaries
from .one_run import audit_canaries
from .plots import plot_canary_statistics
from .policy import evaluate_policy, load_policy
from .report import sanitize, write_deployment_report, write_json
from .targets import probs_of

__all__ = ["NOT_MEASURED", "THREAT_MODEL", "main", "run_deployment_audit"]

DEFAULT_DELTA = 1e-5  # delta of the estimate when the run claims no client-level DP

THREAT_MODEL = (
    "every round's released teacher signal (RUN_DIR/released/roundNNNN.npz: the aggregate on the round's "
    "queries after the server's DP noise, i.e. what the client-level ledger accounts); the released students are "
    "post-processing of these signals and public data. Adversary: anyone who sees the releases, not the server "
    "itself (it also sees individual replies unless they are noised on the device or SecAgg-summed)"
)

NOT_MEASURED = {
    "record-level membership of devices' private records": "needs the devices' data and which records were "
    "trained on; only the devices have them (devices started with canary-records=M export canaries that "
    "measure it: --device-canaries)",
    "membership inference on a device's uploads or local student": "a deployed server keeps no uploads and no "
    "local student exists outside its device (and under SecAgg+ nobody sees an individual upload)",
    "label-distribution inference": "needs each device's true label histogram, which never leaves it",
    "what the server itself can learn from individual replies": "the canaries measure the release; against the "
    "server only local noise or SecAgg+ protects, and the local-noise claim is accounted, not audited here",
}


def load_released(run_dir: str | Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Every round's released ``(queries, signal)`` of a run folder."""
    folder = RunFolder(Path(run_dir))
    rounds = folder.released_rounds()
    if not rounds:
        raise AuditInputError(
            f"{folder.released}: no released teacher signal; the run predates the deployment "
            "audit or never completed a round"
        )
    released = {}
    for rnd, path in rounds.items():
        try:
            with np.load(path, allow_pickle=False) as npz:
                queries, signal = npz["queries"], npz["signal"].astype(np.float64)
        except (OSError, KeyError, ValueError) as exc:
            raise AuditInputError(f"{path}: unreadable released signal ({exc})") from exc
        if signal.ndim != 2 or queries.shape != (signal.shape[0],):
            raise AuditInputError(f"{path}: queries {queries.shape} and signal {signal.shape} do not match")
        released[rnd] = (queries, signal)
    return released


def _results(run_dir: Path) -> RunResults:
    try:
        return read_results(RunFolder(run_dir).results)
    except ResultsFormatError as exc:  # its message names the file
        raise AuditInputError(str(exc)) from exc
    except OSError as exc:
        raise AuditInputError(f"{RunFolder(run_dir).results}: {exc.strerror or exc}") from exc


def _not_measured(device_canaries: bool) -> dict[str, str]:
    if not device_canaries:
        return NOT_MEASURED
    record = "record-level membership of devices' private records"
    return {
        **{k: v for k, v in NOT_MEASURED.items() if k != record},
        "record-level membership of devices' own records": "needs the devices' data; the canary records they "
        "exported measure what the released student memorises of a record instead",
    }


def _claim(run_dir: Path) -> dict[str, Any] | None:
    results = _results(run_dir)
    claim = results.privacy.client_level if results.privacy else None
    return None if claim is None or claim.epsilon is None else claim.to_dict()


def _bounds(estimate: dict[str, Any], claim: dict[str, Any] | None, delta: float) -> list[dict[str, Any]]:
    claimed = None if claim is None else float(claim["epsilon"])
    rows = []
    for source, res, cap in (
        ("canary clients, one-run audit on the coins", estimate["lower_bounds"]["one_run"], "max_cap"),
        (
            "canary clients, threshold test vs held-out",
            estimate["lower_bounds"]["threshold"],
            "max_certifiable_epsilon",
        ),
    ):
        if res is None:
            continue
        lb = float(res["epsilon_lower_bound"])
        rows.append(
            {
                "source": source,
                "epsilon_lower_bound": lb,
                "max_certifiable_epsilon": float(res[cap]),
                "delta": delta,
                "claimed_epsilon": claimed,
                "claimed_delta": None if claim is None else claim["delta"],
                "violation": bool(claimed is not None and lb > claimed),
            }
        )
    return rows


def _device_canary_bounds(
    run_dir: Path, files: Sequence[str | Path], num_classes: int, alpha_each: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The one-run record-level audit of each device's exported canary records against the
    released student (its negative loss on each canary), and each device's record-level claim."""
    if not files:
        return [], {}
    privacy = _results(run_dir).privacy
    record = privacy.record_level if privacy else None
    path = RunFolder(run_dir).global_student
    bounds, details = [], {}
    for f in files:
        try:
            can = load_record_canaries(f)
        except ValueError as exc:
            raise AuditInputError(str(exc)) from exc
        image_size = int(can["x"].shape[-1])
        arch, state = _load_model_file(path, "released student", image_size, num_classes)
        model = build_model(arch, image_size, num_classes)
        model.load_state_dict(state)
        device = int(can["device"])
        claimed, delta = _record_claim(record, device)
        res = audit_canaries(
            loss_scores(probs_of(model, can["x"]), can["y"]), can["included"], delta=delta, beta=alpha_each
        )
        res.pop("guesses", None)
        details[str(device)] = {**res, "file": str(f), "claimed_epsilon": claimed}
        bounds.append(
            {
                "source": f"device {device}'s canary records vs the released student, one-run audit",
                "epsilon_lower_bound": float(res["epsilon_lower_bound"]),
                "max_certifiable_epsilon": float(res["max_cap"]),
                "delta": delta,
                "claimed_epsilon": claimed,
                "claimed_delta": delta if claimed is not None else None,
                "violation": bool(claimed is not None and res["epsilon_lower_bound"] > claimed),
            }
        )
    return bounds, details


def _record_claim(record: Any, device: int) -> tuple[float | None, float]:
    """(the device's own record-level epsilon, or the run's largest; its delta), or (None, default delta)."""
    if record is None or record.epsilon is None:
        return None, DEFAULT_DELTA
    own = (record.get("devices") or {}).get(str(device), {}).get("record-epsilon")
    return float(own if own is not None else record.epsilon), float(record.delta)


def _client_audit(
    run_dir: Path,
    secret_path: str | Path,
    audit_nodes: Sequence[int],
    canaries: int,
    generated: int,
    alpha: tuple[float, float],
) -> tuple[dict[str, Any] | None, dict[str, Any], Any]:
    """The canary-client estimate (interval at 1 - alpha[0]) and its two bounds (each at alpha[1])."""
    try:
        secret = read_secret(secret_path)
    except CanaryError as exc:
        raise AuditInputError(str(exc)) from exc
    claim = _claim(run_dir)
    released = load_released(run_dir)
    delta = float(claim["delta"]) if claim else DEFAULT_DELTA
    stats_ = canary_statistics(released, secret, list(audit_nodes), canaries, generated)
    try:
        return claim, estimate_from_canaries(stats_, delta, alpha[0], bound_alpha=alpha[1]), stats_
    except ValueError as exc:
        raise AuditInputError(str(exc)) from exc


def run_deployment_audit(
    run_dir: str | Path,
    secret_path: str | Path,
    audit_nodes: Sequence[int],
    *,
    canaries: int,
    generated_nodes: int = 16,
    device_canaries: Sequence[str | Path] = (),
    policy_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    alpha: float = 0.05,
) -> tuple[dict[str, Any], int]:
    """Audit a deployed run from its folder and the officer's secret (and the devices' exported
    canary records); write audit.json, report.md and canaries.png to ``out_dir`` (default
    ``RUN_DIR/audit-deployment``). Returns ``(audit, exit_code)``: 0 policy passed, 1 failed.
    Bad input raises :class:`AuditInputError`. Every lower bound holds at ``alpha / n`` for the
    ``n`` bounds reported (two from the canary clients, one per device file): jointly ``1 - alpha``."""
    t0 = time.monotonic()
    run_dir = Path(run_dir)
    if not audit_nodes:
        raise AuditInputError("no --audit-node: name the node ids of the audit SuperNodes (their device-id)")
    policy = load_policy(policy_path)
    n_bounds = 2 + len(device_canaries)
    claim, estimate, stats_ = _client_audit(
        run_dir, secret_path, audit_nodes, canaries, generated_nodes, (alpha, alpha / n_bounds)
    )
    delta = estimate["delta"]
    out = Path(out_dir) if out_dir is not None else RunFolder(run_dir).audit_deployment
    out.mkdir(parents=True, exist_ok=True)
    device_bounds, devices = _device_canary_bounds(run_dir, device_canaries, stats_.num_classes, alpha / n_bounds)
    bounds = _bounds(estimate, claim, delta) + device_bounds
    audit: dict[str, Any] = {
        "kind": "deployment",
        "run_dir": str(run_dir),
        "policy": policy.to_dict(),
        "threat_model": THREAT_MODEL,
        "claimed": claim,
        "claimed_epsilon": None if claim is None else claim["epsilon"],
        "claimed_mu": claimed_mu(claim),  # exact mu-GDP of the claim (q = 1 only): compare with the estimate's mu
        "estimated_epsilon": estimate["epsilon_estimate"],
        "audit_nodes": list(audit_nodes),
        "canaries_per_node": canaries,
        "rounds": stats_.rounds,
        "estimate": estimate,
        "targets": {},
        "epsilon_lower_bounds": bounds,
        "dp_violations": [b for b in bounds if b["violation"]],
        "device_canaries": devices,
        "not_measured": _not_measured(bool(device_canaries)),
        "confidence": {
            "alpha": alpha,
            "n_bounds": n_bounds,
            "note": "each lower bound at 1 - alpha/n_bounds (Bonferroni): jointly 1 - alpha",
        },
    }
    rules, code = evaluate_policy(audit, policy)
    audit["verdict"] = {"passed": code == 0, "exit_code": code, "rules": rules}
    plot = out / RunFolder.audit_file("canaries")
    plot_canary_statistics(stats_.scores, stats_.group, plot, title=f"canary statistics, {run_dir.name}")
    audit["plots"] = {"canaries": plot.name}
    audit["timings_s"] = {"total": time.monotonic() - t0}
    audit = sanitize(audit)
    write_json(out / RunFolder.audit_file("json"), audit)
    write_deployment_report(out / RunFolder.audit_file("markdown"), audit)
    return audit, code


def _eps(x: float | None) -> str:
    return "unbounded (> 100)" if x is None else f"{x:.3g}"


def main(
    run_dir: str,
    secret: str,
    audit_nodes: Sequence[int],
    canaries: int,
    policy: str | None = None,
    out: str | None = None,
    generated_nodes: int = 16,
    device_canaries: Sequence[str] = (),
) -> int:
    """CLI entry point: 0 policy passed, 1 failed (a DP violation always fails), 2 bad input."""
    try:
        audit, code = run_deployment_audit(
            run_dir,
            secret,
            audit_nodes,
            canaries=canaries,
            generated_nodes=generated_nodes,
            device_canaries=device_canaries,
            policy_path=policy,
            out_dir=out,
        )
    except AuditInputError as exc:
        print(f"feddistill audit-deployment: error: {exc}", file=sys.stderr)
        return 2
    est = audit["estimate"]
    claimed = audit["claimed_epsilon"]
    print(f"claimed client-level epsilon: {'none (no client-level DP)' if claimed is None else f'{claimed:.3g}'}")
    low, high = est["epsilon_estimate_interval"]
    print(f"estimated epsilon: {_eps(audit['estimated_epsilon'])} (interval {_eps(low)} .. {_eps(high)})")
    for b in audit["epsilon_lower_bounds"]:
        print(
            f"lower bound ({b['source']}): {b['epsilon_lower_bound']:.3g}{'  DP VIOLATION' if b['violation'] else ''}"
        )
    for r in audit["verdict"]["rules"]:
        print(f"VERDICT {'PASS' if r['passed'] else 'FAIL'} {r['rule']}: {r['detail']}")
    folder = Path(out) if out is not None else RunFolder(Path(run_dir)).audit_deployment
    print(f"{'PASSED' if code == 0 else 'FAILED'}; report: {folder / RunFolder.audit_file('markdown')}")
    return code
