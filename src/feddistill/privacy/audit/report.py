"""Writing an audit: ``audit.json``, a Markdown report for privacy officers, log-log ROC PNGs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from feddistill.atomic import atomic_path
from feddistill.atomic import write_json as _write_json
from feddistill.runfolder import RunFolder

from .plots import plot_roc_loglog

__all__ = ["sanitize", "write_deployment_report", "write_json", "write_roc_plots", "write_report"]

_FPRS = (("0.1", "10 %"), ("0.01", "1 %"), ("0.001", "0.1 %"))


def sanitize(obj: Any) -> Any:
    """Plain JSON types only: numpy scalars/arrays converted, non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return sanitize(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj


def write_json(path: Path, data: dict[str, Any]) -> None:
    """audit.json: strict JSON (no NaN), written atomically."""
    _write_json(path, data, allow_nan=False)


def write_roc_plots(
    out: Path, curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], targets: dict[str, Any]
) -> dict[str, str]:
    """One log-log ROC per target, with the (eps, delta)-DP bound of the claim that
    protects a record of that target (Kairouz et al. 2015) when the run claims DP."""
    written: dict[str, str] = {}
    for name, cv in curves.items():
        t = targets[name]
        claim = t.get("claimed")
        kw: dict[str, Any] = {}
        if claim:
            kw = {"dp_epsilon": claim["epsilon"], "dp_delta": claim["delta"]}
        labelled = {f"{a} (AUC {t['attacks'][a]['summary']['auc']:.3f})": c for a, c in cv.items()}
        path = out / RunFolder.audit_roc(name)
        plot_roc_loglog(
            labelled, path, title=f"{name}: {t['n_members']} members / {t['n_nonmembers']} non-members", **kw
        )
        written[name] = path.name
    return written


def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "∞"
        return f"{x:.{digits}f}"
    return str(x)


def _claim_text(c: dict[str, Any] | None) -> str:
    if not c:
        return "none (the run claims no DP for this target)"
    txt = (
        f"ε = {_f(c['epsilon'])} at δ = {c['delta']:.3g} ({c['unit']}-level, {c['mechanism']}, "
        f"accountant {c['accountant']}, {c['neighbouring']})"
    )
    if c.get("epsilon_is"):
        txt += f"; ε is {c['epsilon_is']}"
    if c.get("derivation") and c["derivation"] != "as claimed":
        txt += f"; per record: {c['derivation']}"
    return txt


def _target_section(name: str, t: dict[str, Any], plot: str | None) -> list[str]:
    lines = [f"### `{name}`", ""]
    if t.get("skipped"):
        return lines + [f"Skipped: {t['reason']}.", ""]
    lines += [
        f"{t['description']}.",
        "",
        f"- Candidates: {t['n_members']} members, {t['n_nonmembers']} class-matched non-members "
        f"({t['n_fit']} fit / {t['n_eval']} evaluation); {t.get('reference_models', 0)} reference models.",
        f"- Claimed privacy for one record: {_claim_text(t.get('claimed'))}.",
        "",
        "| attack | AUC | TPR @ 10 % FPR [95 % CI] | TPR @ 1 % FPR [95 % CI] | TPR @ 0.1 % FPR [95 % CI] "
        "| advantage | ε lower bound (eval split) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for a, res in t["attacks"].items():
        s = res["summary"]
        cells = []
        for key, _ in _FPRS:
            r = s["tpr_at_fpr"][key]
            star = "" if r["resolvable"] else "*"
            cells.append(f"{_f(r['tpr'])}{star} [{_f(r['tpr_ci'][0])}, {_f(r['tpr_ci'][1])}]")
        mark = " (chosen on fit split)" if a == t["best_attack"] else ""
        lines.append(
            f"| {a}{mark} | {_f(s['auc'])} | "
            + " | ".join(cells)
            + f" | {_f(s['advantage'])} | {_f(res['empirical_epsilon']['epsilon_lower_bound'])} |"
        )
    lines.append("")
    if any(not r["resolvable"] for res in t["attacks"].values() for r in res["summary"]["tpr_at_fpr"].values()):
        lines += [
            "\\* the target FPR is below 1 / (number of non-members): the value is the TPR at zero false positives.",
            "",
        ]
    for a, why in t.get("skipped_attacks", {}).items():
        lines.append(f"- `{a}` not run: {why}.")
    claim = t.get("claimed")
    verdict = ""
    if claim:
        verdict = " — **DP VIOLATION**: above the claimed ε" if t["violation"] else " — consistent with the claimed ε"
    lines += [
        f"**Empirical ε lower bound: {_f(t['epsilon_lower_bound'])}** "
        f"(attack `{t['best_attack']}`, δ = {t['delta']:.3g}; "
        f"the most this sample could certify: {_f(t['max_certifiable_epsilon'])}) vs claimed ε "
        f"{_f(claim['epsilon']) if claim else 'none'}{verdict}.",
        "",
    ]
    pc = t.get("per_class", {})
    if pc:
        lines += [
            f"Per class (`{t['best_attack']}`):",
            "",
            "| class | members | non-members | AUC | TPR @ 1 % FPR |",
            "| --- | --- | --- | --- | --- |",
        ]
        for k, v in pc.items():
            if v.get("skipped"):
                lines.append(f"| {k} | {v['n_members']} | {v['n_nonmembers']} | – ({v['reason']}) | – |")
            else:
                lines.append(
                    f"| {k} | {v['n_members']} | {v['n_nonmembers']} | {_f(v['auc'])} | "
                    f"{_f(v['tpr_at_fpr']['0.01']['tpr'])} |"
                )
        lines.append("")
    pcl = t.get("per_client", {})
    if pcl:
        lines += [
            f"Per client (its members vs all non-members, `{t['best_attack']}`):",
            "",
            "| client | members | AUC | TPR @ 1 % FPR |",
            "| --- | --- | --- | --- |",
        ]
        for k, v in pcl.items():
            lines.append(f"| {k} | {v['n_members']} | {_f(v['auc'])} | {_f(v['tpr_at_fpr']['0.01']['tpr'])} |")
        lines.append("")
    if plot:
        lines += [f"![log-log ROC of {name}]({plot})", ""]
    return lines


def _best_auc(t: dict[str, Any] | None) -> str:
    if not t or t.get("skipped"):
        return "–"
    a = t["best_auc_attack"]
    return f"{_f(t['attacks'][a]['summary']['auc'])} ({a})"


def _client_summary(audit: dict[str, Any]) -> list[str]:
    """One row per audited client: its two targets and what its uploads betray of its labels."""
    targets, labels = audit["targets"], audit["label_inference"]["clients"]
    if not audit["target_clients"]:
        return []
    lines = [
        "## Per client",
        "",
        "| client | uploads: best AUC | local student: best AUC | label TV (uniform guess) |",
        "| --- | --- | --- | --- |",
    ]
    for pid in audit["target_clients"]:
        li = labels.get(str(pid))
        tv = f"{_f(li['tv'])} ({_f(li['tv_uniform_guess'])})" if li else "–"
        lines.append(
            f"| {pid} | {_best_auc(targets.get(f'uploads_client{pid}'))} | "
            f"{_best_auc(targets.get(f'local_client{pid}'))} | {tv} |"
        )
    return lines + [""]


def write_report(path: Path, audit: dict[str, Any]) -> None:
    """report.md: the verdict, the claims, the bounds against them, every target, the method."""
    lines = (
        _verdict_lines(audit)
        + _claims_lines(audit)
        + _bounds_lines(audit)
        + _client_summary(audit)
        + _targets_lines(audit)
        + _canary_lines(audit)
        + _label_lines(audit)
        + _method_lines(audit)
    )
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))


def _verdict_lines(audit: dict[str, Any]) -> list[str]:
    v = audit["verdict"]
    lines = [
        f"# Privacy audit of `{audit['run_dir']}`",
        "",
        f"**{'PASSED' if v['passed'] else 'FAILED'}** "
        f"(exit code {v['exit_code']}; policy: {audit['policy']['source']})",
        "",
    ]
    for r in v["rules"]:
        lines.append(f"- VERDICT: {'PASS' if r['passed'] else '**FAIL**'} — `{r['rule']}`: {r['detail']}")
    lines.append("")
    return lines


def _claims_lines(audit: dict[str, Any]) -> list[str]:
    lines = ["## Privacy claims of the run", ""]
    claims = audit["privacy_claims"]
    if not any(claims.values()):
        return lines + [
            "The run claims no differential privacy: the attacks below measure leakage, there is no claim to violate.",
            "",
        ]
    lines += ["| unit | ε | δ | mechanism | accountant | neighbouring |", "| --- | --- | --- | --- | --- | --- |"]
    for unit, c in claims.items():
        if c:
            lines.append(
                f"| {unit} | {_f(c['epsilon'])} | {c['delta']:.3g} | {c.get('mechanism', '–')} | "
                f"{c.get('accountant', '–')} | {c.get('neighbouring', 'add/remove (assumed)')} |"
            )
    lines.append("")
    for name, c in audit["claims_per_target"].items():
        lines.append(f"- applies to one record of `{name}`: {_claim_text(c)}")
    lines.append("")
    return lines


def _bounds_lines(audit: dict[str, Any]) -> list[str]:
    conf = audit["confidence"]
    lines = [
        "## Empirical ε lower bounds vs claimed ε",
        "",
        f"Each bound holds at confidence 1 − {conf['alpha']:g}/{conf['n_bounds']} (Bonferroni), "
        "so all of them hold jointly "
        f"at {1 - conf['alpha']:.0%}.",
        "",
        "| source | ε lower bound | max certifiable | δ | claimed ε | result |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for b in audit["epsilon_lower_bounds"]:
        if b["claimed_epsilon"] is None:
            res = "no claim"
        elif b["violation"]:
            res = "**DP VIOLATION**"
        elif b["max_certifiable_epsilon"] is not None and b["claimed_epsilon"] >= b["max_certifiable_epsilon"]:
            res = "ok (but the claim is above what this sample can certify: a violation could not show)"
        else:
            res = "ok"
        lines.append(
            f"| {b['source']} | {_f(b['epsilon_lower_bound'])} | {_f(b['max_certifiable_epsilon'])} | "
            f"{b['delta']:.3g} | {_f(b['claimed_epsilon'])} | {res} |"
        )
    lines.append("")
    return lines


def _targets_lines(audit: dict[str, Any]) -> list[str]:
    lines = ["## Membership inference per target", ""]
    for name, t in audit["targets"].items():
        lines += _target_section(name, t, audit.get("plots", {}).get(name))
    return lines


def _canary_lines(audit: dict[str, Any]) -> list[str]:
    can = audit.get("canary_audit")
    lines = ["## Canary audit (one run, Steinke, Nasr & Jagielski 2023)", ""]
    if not can:
        return lines + ["The run has no canaries (set `audit.canaries` > 0 to check the DP implementation itself).", ""]
    lines += [
        f"{can['m']} canaries, {can['n_included']} included in client {can['client']}'s data "
        "(each with probability ½); "
        f"score: {can['score']}.",
        "",
        "| target | guesses | correct | ε lower bound | cap (all correct) | claimed ε | result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, r in can["results"].items():
        claim = r.get("claimed")
        res = "no claim" if not claim else ("**DP VIOLATION**" if r["violation"] else "ok")
        lines.append(
            f"| {kind} | {r['n_guesses']} | {r['n_correct']} | {_f(r['epsilon_lower_bound'])} | "
            f"{_f(r['max_cap'])} | {_f(claim['epsilon']) if claim else '–'} | {res} |"
        )
    lines.append("")
    return lines


def _label_lines(audit: dict[str, Any]) -> list[str]:
    li = audit["label_inference"]
    lines = [
        "## Label-distribution inference from uploads (Shi, Ouyang & Wang 2025)",
        "",
        f"Estimate: {li['method']}. Lower TV = more leakage; baselines: {li['baselines']}.",
        "",
    ]
    if not li["clients"]:
        return lines
    s = li["summary"]
    lines += [
        f"Mean TV {_f(s['mean_tv'])} vs uniform guess {_f(s['mean_tv_uniform_guess'])} and population prior "
        f"{_f(s['mean_tv_population_prior'])}; the uploads beat the prior for {s['clients_better_than_prior']} of "
        f"{s['n_clients']} clients.",
        "",
        "| client | private examples | TV | KL (nats) | TV uniform guess | TV population prior |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for pid, r in li["clients"].items():
        lines.append(
            f"| {pid} | {r['n_private']} | {_f(r['tv'])} | {_f(r['kl'])} | {_f(r['tv_uniform_guess'])} | "
            f"{_f(r['tv_population_prior'])} |"
        )
    lines.append("")
    return lines


def _method_lines(audit: dict[str, Any]) -> list[str]:
    lines = ["## Method", ""]
    for k, text in audit["methodology"].items():
        lines.append(f"- **{k.replace('_', ' ')}**: {text}.")
    lines.append("")
    if audit.get("warnings"):
        lines += ["## Warnings", ""] + [f"- {w}" for w in audit["warnings"]] + [""]
    t = audit.get("timings_s", {})
    if t:
        lines += [f"Audit time: {t.get('total', 0):.1f} s.", ""]
    return lines


def _eps_text(x: Any) -> str:
    return "unbounded (> 100: no measurable noise)" if x is None else _f(x)


def write_deployment_report(path: Path, audit: dict[str, Any]) -> None:
    """report.md of `feddistill audit-deployment`: verdict, claimed vs estimated epsilon, the
    lower bounds, the threat model, and what a deployment audit cannot measure and why."""
    est, claim = audit["estimate"], audit["claimed"]
    low, high = est["epsilon_estimate_interval"]
    lines = _verdict_lines(audit) + [
        "## Claimed vs estimated client-level ε",
        "",
        f"- **Claimed ε**: {_eps_text(claim['epsilon']) if claim else 'none (the run claims no client-level DP)'}"
        + (
            f" at δ = {claim['delta']:.3g} ({claim.get('mechanism', '–')}, {claim.get('accountant', '–')})"
            if claim
            else ""
        ),
        f"- **Estimated ε** (one-shot, Andrew et al. 2024): {_eps_text(est['epsilon_estimate'])} at δ = "
        f"{est['delta']:.3g}; {1 - audit['confidence']['alpha']:.0%} interval {_eps_text(low)} .. {_eps_text(high)} "
        f"(mu = {_f(est['mu_client'])}, extrapolated from the canaries' mu {_f(est['mu_canary'])}; "
        f"mu interval {_f(est['mu_client_interval'][0])} .. {_f(est['mu_client_interval'][1])})",
        f"- Claimed mu (the claim as mu-GDP, exact without client sampling): {_f(audit.get('claimed_mu'))}",
        f"- ε one canary leaks: {_eps_text(est['epsilon_estimate_per_canary'])}",
        f"- Canaries: {est['inserted']['n']} inserted, {est['held_out']} held out, {est['generated']} generated; "
        f"audit nodes {audit['audit_nodes']} with {audit['canaries_per_node']} canaries each; "
        f"rounds {audit['rounds']}",
        "",
        "| lower bound | ε lower bound | max certifiable | claimed ε | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for b in audit["epsilon_lower_bounds"]:
        res = "no claim" if b["claimed_epsilon"] is None else ("**DP VIOLATION**" if b["violation"] else "ok")
        lines.append(
            f"| {b['source']} | {_f(b['epsilon_lower_bound'])} | {_f(b['max_certifiable_epsilon'])} | "
            f"{_f(b['claimed_epsilon'])} | {res} |"
        )
    lines += ["", f"**Threat model**: {audit['threat_model']}.", "", "## Not measured in a deployment", ""]
    lines += [f"- {what}: {why}." for what, why in audit["not_measured"].items()]
    lines += ["", f"![canary statistics]({audit['plots']['canaries']})", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
