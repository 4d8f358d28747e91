"""The README's measured tables, rendered from the benchmark JSON files.

``python -m bench readme`` rewrites every block between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->`` in README.md from ``bench/results/NAME/NAME.json``;
``tests/test_readme_results.py`` checks that the README still says what the files say.

The digits quick start's table is one of them: ``bash scripts/quickstart.sh --record`` runs the
quick start, then ``python -m bench.readme --quickstart runs/quickstart`` reads its figures from
the run folder into ``bench/results/quickstart/quickstart.json`` (:func:`record_quickstart`) and
rewrites the blocks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(r"(<!-- bench:(?P<name>[a-z]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.S)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _kb(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1000:.1f} KB" if n >= 1000 else f"{n:.0f} B"


def _eps(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def privacy(d: dict[str, Any]) -> str:
    runs = d["runs"]
    lines = [
        f"Fashion-MNIST, 100 clients, Dirichlet α=0.5, q=0.1, {d['rounds']} rounds, seed 0, one benchmark run;",
        "ε at δ=1e-5 from the PLD accountant (the number `results.json` reports).",
        "",
        "| run | unit | ε spent (target) | test accuracy | private gain (points) | fleet-labelled rows |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def gain(row: dict) -> str:  # against the public-only control; "–" for runs that predate it
        g, rows = row.get("private_gain"), row.get("fleet_labelled_rows")
        return f"{'–' if g is None else f'{g:+.1f}'} | {'–' if rows is None else f'{rows:,}'}"

    def spent(row: dict, level: str, name: str) -> str:
        p = row.get(level) or {}
        target = p.get("target_epsilon") or float(name.rsplit("eps", 1)[1])  # DP-FedAvg: calibrated, not enforced
        return f"{_eps(p.get('epsilon'))} ({_eps(target)})" if p else "–"

    lines.append(
        f"| feddistill, non-private | – | ∞ | {_pct(runs['non-private']['accuracy'])} | {gain(runs['non-private'])} |"
    )
    lines.append(f"| Flower FedAvg, non-private | – | ∞ | {_pct(runs['fedavg']['accuracy'])} | – | – |")
    for name in sorted((n for n in runs if n.startswith("record-")), key=lambda n: float(n[len("record-eps") :])):
        lines.append(
            f"| feddistill, DP-SGD on devices | record | {spent(runs[name], 'record_level', name)} | "
            f"{_pct(runs[name]['accuracy'])} | {gain(runs[name])} |"
        )
    for prefix, label in (("client-", "feddistill, GNMax votes"), ("dp-fedavg-", "Flower DP-FedAvg")):
        for name in sorted((n for n in runs if n.startswith(prefix)), key=lambda n: float(n.rsplit("eps", 1)[1])):
            peer = label.startswith("Flower")
            lines.append(
                f"| {label} | client | {spent(runs[name], 'client_level', name)} | {_pct(runs[name]['accuracy'])} | "
                f"{'– | –' if peer else gain(runs[name])} |"
            )
    public_only = runs["non-private"].get("public_only_student_accuracy")
    lines += [
        "",
        "Private gain = student − the public-only control through the same server pipeline; "
        '"–": the run predates that control (rerun the suite to measure it). '
        f"Student distilled from the public teacher alone (round 0): {_pct(public_only)}. "
        f"Client-level ε≈4: feddistill − DP-FedAvg = {d['gap_points_client_eps4_vs_dp_fedavg']:+.1f} points; "
        f"record-level ε=3: {_pct(d['record_eps3_accuracy'])}.",
    ]
    return "\n".join(lines) + "\n"


def faults(d: dict[str, Any]) -> str:
    runs, robust = d["runs"], d["robust_aggregator"]
    lines = [
        f"Same fleet, {d['rounds']} rounds; 20 % of clients hostile (fixed by the seed), each attack in its own run.",
        "",
        f"| scenario | plain mean | {robust} | dropped replies ({robust}) |",
        "| --- | --- | --- | --- |",
    ]
    lines.append(
        f"| clean | {_pct(runs['clean-mean']['accuracy'])} | {_pct(runs[f'clean-{robust}']['accuracy'])} | "
        f"{runs[f'clean-{robust}'].get('dropped_replies', 0)} |"
    )
    for attack in d["robust_gap_points_vs_clean"]:
        mean = runs.get(f"{attack}-mean")
        # scaled / NaN / wrong-shape replies never reach an aggregator; finite attacks without a mean run were not run
        absent = "not run" if attack in ("label-flip", "random") else "dropped by validation"
        lines.append(
            f"| 20 % {attack} | {_pct(mean['accuracy']) if mean else absent} | "
            f"{_pct(runs[f'{attack}-{robust}']['accuracy'])} | {runs[f'{attack}-{robust}'].get('dropped_replies', 0)} |"
        )
    lines.append(
        f"| 30 % dropouts per round | {_pct(runs['dropout30-mean']['accuracy'])} | – | "
        f"{runs['dropout30-mean'].get('dropped_replies', 0)} |"
    )
    worst = max(d["robust_gap_points_vs_clean"].items(), key=lambda kv: kv[1])
    lines += [
        "",
        f"Largest loss of {robust} against its clean run: {worst[1]:.1f} points ({worst[0]}); "
        f"30 % dropouts cost {d['dropout30_cost_points']:.1f} points.",
    ]
    return "\n".join(lines) + "\n"


def comms(d: dict[str, Any]) -> str:
    fed = d["fedavg"]
    lines = [
        f"Same fleet, {d['rounds']} rounds, 1,000 queries per round; FedAvg sends the CNN's weights.",
        "",
        "| upload | bytes / client-round | FedAvg's bytes ÷ these | test accuracy | cost vs float16 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in d["encodings"].items():
        lines.append(
            f"| answers, {name} | {_kb(row['bytes_per_client_round'])} | {row['fedavg_bytes_over_these']:.0f}× | "
            f"{_pct(row['accuracy'])} | {row['accuracy_cost_points_vs_float16']:+.1f} points |"
        )
    lines.append(
        f"| Flower FedAvg (model weights) | {_kb(fed['bytes_per_client_round'])} | 1× | {_pct(fed['accuracy'])} | |"
    )
    return "\n".join(lines) + "\n"


def audit(d: dict[str, Any]) -> str:
    lines = [
        "| digits run | target | best attack | AUC | TPR@1 % FPR | TPR@0.1 % FPR | empirical ε (lower bound) | claimed ε |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run, r in d["digits"].items():
        for target, t in r["targets"].items():
            if "skipped" in t:
                lines.append(f"| {run} | {target} | skipped: {t['skipped']} | | | | | |")
                continue
            lines.append(
                f"| {run} | {target} | {t['best_attack']} | {t['auc']:.3f} | {t['tpr_at_1pct_fpr']:.3f} | "
                f"{t['tpr_at_0.1pct_fpr']:.3f} | {t['empirical_epsilon_lower_bound']:.2f} | "
                f"{_eps(t['claimed_epsilon'])} |"
            )
    lines += [
        "",
        "One-run canary audit (Steinke, Nasr & Jagielski 2023; 100 canaries, each in client 0's data with "
        "probability ½), empirical ε lower bound vs the claimed ε for the same target:",
        "",
        "| digits run | " + " | ".join(f"canaries vs {k}" for k in ("local", "uploads", "global")) + " |",
        "| --- | --- | --- | --- |",
    ]
    for run, r in d["digits"].items():
        cells = []
        for kind in ("local", "uploads", "global"):
            c = r["canary_audit"].get(kind)
            claimed = "no claim" if not c or not c["claimed"] else f"claimed {c['claimed']['epsilon']:.2f}"
            cells.append("–" if not c else f"{c['epsilon_lower_bound']:.2f} ({claimed})")
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "DP violations found: " + ", ".join(f"{run} {r['dp_violations']}" for run, r in d["digits"].items()) + ".",
    ]
    secs = d["audit_seconds"]
    lines += ["", "Audit time on 2 cores: " + "; ".join(f"{k}: {v:.0f} s" for k, v in secs.items()) + "."]
    return "\n".join(lines) + "\n"


def _eps_or_inf(x: float | None) -> str:
    return "> 100" if x is None else f"{x:.2f}"


def _mu_ci(e: dict[str, Any]) -> str:
    low, high = e["mu_client_interval"]
    return f"{e['mu_client']:.2f} [{low:.2f}, {high:.2f}]"


def _ratio(e: dict[str, Any] | None, claim: float) -> str:
    return "–" if e is None else f"{e['mu_client'] / claim:.2f}"


def _opt(x: float | None) -> str:
    return "none" if x is None else f"{x:.2f}"


def canary(d: dict[str, Any]) -> str:
    cal, cost, pooled, c = d["calibration"], d["cost"], d["pooled"], d["checks"]
    lines = [
        f"Calibration fleet: {d['calibration_fleet']}, {d['rounds']} rounds, {d['seeds']} seed(s) (one row each), "
        f"δ = {d['delta']:g}. mu: the claim as mu-GDP (exact at q = 1) and the estimate in the same unit; "
        "lower bound: the larger of the one-run and threshold bounds (jointly 95 %).",
        "",
        "| run | claimed ε | claimed mu | estimated mu [95 %] | estimated ε [95 %] | mu before post-processing [95 %] "
        "| ε lower bound | DP violation flagged | accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("eps1", "eps4", "eps16", "no-dp", "broken-eps1"):
        for r in cal[name]:
            low, high = r["estimate_interval"]
            gaussian = r.get("before_post_processing")
            lines.append(
                f"| {name} | {_opt(r['claimed_epsilon'])} | {_opt(r['claimed_mu'])} | {_mu_ci(r)} | "
                f"{_eps_or_inf(r['estimated_epsilon'])} [{_eps_or_inf(low)}, {_eps_or_inf(high)}] | "
                f"{'–' if gaussian is None else _mu_ci(gaussian)} | {r['lower_bound']:.2f} | "
                f"{'**yes**' if r['violation'] else 'no'} | {_pct(r['accuracy'])} |"
            )
    lines += [
        "",
        f"Seeds pooled (inverse-variance, 95 % normal interval), {d['slots']} audit slots:",
        "",
        "| setting | claimed mu | estimated mu, release [95 %] | estimate / claim | mu before post-processing [95 %] "
        "| estimate / claim |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("eps1", "eps4", "eps16"):
        p = pooled[name]
        gaussian = p.get("before_post_processing")
        lines.append(
            f"| {name} | {p['claimed_mu']:.2f} | {_mu_ci(p['release'])} | "
            f"{_ratio(p['release'], p['claimed_mu'])} | {'–' if gaussian is None else _mu_ci(gaussian)} | "
            f"{_ratio(gaussian, p['claimed_mu'])} |"
        )
    widths = d["half_width_by_slots"]
    lines += [
        "",
        "Precision: the release's 95 % half-width in mu when the officer audits the first n audit nodes "
        "(mean over the DP runs), and what sqrt(2 / n) scaling from the last column predicts:",
        "",
        "| audit nodes audited | " + " | ".join(widths) + " |",
        "| --- |" + " --- |" * len(widths),
        "| half-width, measured | " + " | ".join(f"±{w:.2f}" for w in widths.values()) + " |",
    ]
    last_n, last_w = int(list(widths)[-1]), list(widths.values())[-1]
    lines.append(
        "| half-width, ∝ sqrt(2 / n) | "
        + " | ".join(f"±{last_w * math.sqrt(last_n / int(n)):.2f}" for n in widths)
        + " |"
    )
    gauss = ""
    if "before_post_processing_tracks_claim" in c:
        gauss = (
            f" Before post-processing: increasing {'yes' if c['before_post_processing_tracks_claim'] else '**no**'}; "
            f"the claim inside the interval in {c['claim_inside_estimate_interval_before_post_processing']} of "
            f"{c['honest_runs']} runs and in {c['claim_inside_pooled_interval_before_post_processing']} of 3 pooled."
        )
    lines += [
        "",
        f"Checks: lower bound never above the claim: {'yes' if c['lower_bound_never_above_claim'] else '**no**'} "
        f"({c['audited_dp_runs']} audited DP runs); estimated mu increasing with the claim (pooled): "
        f"{'yes' if c['estimate_tracks_claim'] else '**no**'}; the claim inside the release estimate's interval in "
        f"{c['claim_inside_estimate_interval']} of {c['honest_runs']} DP runs; pooled estimate's interval not "
        f"above the claim: {'yes' if c['estimate_not_above_claim_pooled'] else '**no**'}; the broken run flagged: "
        f"{'yes' if c['broken_flagged'] else '**no**'}.{gauss}",
        "",
        f"Cost fleet: {d['cost_fleet']}, {d['rounds']} rounds, mean over {d['cost_seeds']} seed(s):",
        "",
        "| audit slots | accuracy, no DP | accuracy, ε = 16 |",
        "| --- | --- | --- |",
    ]

    def mean_acc(name: str) -> str:
        return _pct(sum(r["accuracy"] for r in cost[name]) / len(cost[name]))

    lines.append(
        f"| none (the 4 slots answer honestly) | {mean_acc('no-dp-no-audit')} | {mean_acc('eps16-no-audit')} |"
    )
    lines.append(f"| 4 audit nodes answering canaries | {mean_acc('no-dp')} | {mean_acc('eps16')} |")
    return "\n".join(lines) + "\n"


def scale(d: dict[str, Any]) -> str:
    lines = [
        "| clients | sampled per round | engine | wall time | outside the rounds | seconds / round "
        "| peak RSS (process tree) | accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in d["runs"].values():
        q = row.get("fraction", 0.1)
        outside = row["wall_seconds"] - sum(row["round_seconds"])  # data, teacher, start-up, final evaluation
        engine = row["engine"]
        if engine != "in-process loop" and row.get("linkstate") != "indexed":
            engine += ", Flower's LinkState (before the index)"
        if row.get("stopped_after_round"):  # a run stopped at a deadline: its rounds so far
            engine += f", stopped after round {row['stopped_after_round']} of {row['rounds_planned']}"
        lines.append(
            f"| {row['clients']:,} | q = {q:g} (≈ {row['clients'] * q:.0f}), {row.get('partition', 'dirichlet')} "
            f"| {engine} | {row['wall_seconds'] / 60:.1f} min "
            f"| {outside / 60:.1f} min | {row['round_seconds_mean']:.1f} "
            f"| {row['peak_rss_gib']:.2f} GiB | {_pct(row['accuracy'])} |"
        )
    if "overhead_ratio_per_round" in d:
        lines += [
            "",
            f"Orchestration overhead at 100 clients (Flower simulation ÷ in-process loop, same run): "
            f"{d['overhead_ratio_per_round']:.2f}× per round, {d['overhead_ratio_wall']:.2f}× wall time.",
        ]
    return "\n".join(lines) + "\n"


def _deploy_rows(d: dict[str, Any]) -> list[str]:
    sim, sim_secagg, dep = d["simulation"], d["simulation_secagg"], d["deployment"]
    rows = [
        ("simulation engine, 3 clients", sim, d["simulation_bytes_per_client_round"]),
        ("simulation engine, 3 clients, SecAgg+", sim_secagg, sim_secagg["bytes_per_client_round"]),
        ("3 SuperNodes, TLS + node auth + signed downloads, loopback", dep, dep.get("bytes_per_client_round")),
    ]
    if "deployment_secagg" in d:
        secagg = d["deployment_secagg"]
        rows.append(
            (
                "3 SuperNodes, TLS + node auth + signed downloads, SecAgg+, loopback",
                secagg,
                secagg["bytes_per_client_round"],
            )
        )
    return [
        "| | seconds / round (mean) | bytes / client-round | wall time |",
        "| --- | --- | --- | --- |",
        *(
            f"| {label} | {row['round_seconds_mean']:.1f} | {_kb(bytes_)} | {row['wall_seconds']:.0f} s |"
            for label, row, bytes_ in rows
        ),
    ]


def _deploy_secagg_text(d: dict[str, Any]) -> str:
    sim, sim_secagg = d["simulation"], d["simulation_secagg"]
    text = (
        f"On the simulation engine SecAgg+ changed the time per round by "
        f"{sim_secagg['round_seconds_mean'] - sim['round_seconds_mean']:+.1f} s"
    )
    if "deployment_secagg" in d:
        dep, secagg = d["deployment"], d["deployment_secagg"]
        text += (
            f", in the deployment by {secagg['round_seconds_mean'] - dep['round_seconds_mean']:+.1f} s "
            f"({secagg['round_seconds_mean'] / dep['round_seconds_mean']:.1f}×: SecAgg+ takes four message "
            "exchanges per round instead of one, and a SuperNode starts a fresh ClientApp process for each)"
        )
    return (
        text + f". Its cost in bytes: {_kb(sim_secagg['bytes_per_client_round'])} per client-round instead of "
        f"{_kb(d['simulation_bytes_per_client_round'])}: every answer entry travels as an 8-byte masked integer "
        "instead of a float16 (these counts are the answers' payload; SecAgg+'s key and share messages, a few "
        "public keys and encrypted Shamir shares per neighbour, are not counted). The deployment's rounds are "
        "slower than the simulation's "
        "because each SuperNode starts a fresh ClientApp process per message."
    )


def deploy(d: dict[str, Any]) -> str:
    f = d["client_footprint"]
    rss = ", ".join(f"{v:.0f}" for v in f["supernode_peak_rss_mib"].values())
    imports = sorted(f["clientapp_import_seconds"])
    lines = [
        *_deploy_rows(d),
        "",
        _deploy_secagg_text(d),
        "",
        f"Client footprint: peak RSS per SuperNode with its ClientApp processes {rss} MiB; a fresh ClientApp "
        f"process imports in {imports[len(imports) // 2]:.1f} s (median of {len(imports)}); the environment's "
        f"site-packages take {f['venv_site_packages_mib']:.0f} MiB, torch "
        f"{f['largest_packages_mib'].get('torch', 0):.0f} MiB of it.",
    ]
    return "\n".join(lines) + "\n"


def install(d: dict[str, Any]) -> str:
    device, full = d["profiles"]["device"], d["profiles"]["full"]
    lines = [
        "| install | command | site-packages | of it torch | distributions | ClientApp process start, CPU "
        f"(median of {d['runs']}): trains nothing / trains | wall (median) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in (("device", device), ("full", full)):
        routing, training = row["cold_start"]["routing"], row["cold_start"]["training"]
        lines.append(
            f"| {name} | `{d['commands'][name]}` | {row['site_packages_mib']:.0f} MiB | {row['torch_mib']:.0f} MiB | "
            f"{row['distributions']} | {routing['cpu_median']:.1f} s / {training['cpu_median']:.1f} s | "
            f"{routing['wall_median']:.1f} s / {training['wall_median']:.1f} s |"
        )
    saved = full["site_packages_mib"] - device["site_packages_mib"]
    check = d["device_check"]
    rounds = ", ".join(f"{kind} {'ok' if r['ok'] else 'FAILED'}" for kind, r in check["rounds"].items())
    left_out = sorted(set(full["excluded_installed"]) - set(device["excluded_installed"]))
    load = " to ".join(f"{x:.0f}" for x in d["load_average"])
    walls = {
        name: ", ".join(f"{s:.1f}" for s in row["cold_start"]["training"]["wall_seconds"])
        for name, row in (("device", device), ("full", full))
    }
    lines += [
        "",
        f"`full` is `scripts/setup.sh`'s environment: `.[full]` plus the test tools (pytest, hypothesis, ruff, mypy). "
        f"The device install is {saved:.0f} MiB ({100 * saved / full['site_packages_mib']:.0f} %) smaller: it leaves out "
        f"{', '.join(left_out)} (and what they pull in); torch is {100 * device['torch_mib'] / device['site_packages_mib']:.0f} % of what remains. "
        f"A deployed SuperNode starts a fresh ClientApp process per message (after one warm-up here). One that trains "
        f"nothing (an identify query, SecAgg+'s key and unmask stages) loads only the ClientApp's routing, without torch; "
        f"one that trains also imports the training code. Either costs about the same in both installs, because the "
        f"ClientApp imports none of the left-out packages (wall seconds of the processes that train: device "
        f"{walls['device']}; full {walls['full']}; taken in turns, on {d['environment']['cpus']} cores with a load "
        f"average of {load}, so the CPU time is the figure to compare). In the device environment "
        f"`python -m feddistill.deploy.device_check` answered one request of each kind through the ClientApp: {rounds}; "
        f"packages of the full install it imported: {', '.join(check['heavy_imported']) or 'none'}.",
    ]
    node = d.get("supernode_round")
    if node:
        lines[-1] += (
            f" And a real round on loopback (a SuperLink of the full install with TLS, SuperNode authentication and "
            f"signed downloads; {node['supernodes']} `flower-supernode` processes of the device install, whose "
            f"ClientApp processes ran in the device environment): {node['replies']} replies from {node['clients']} "
            f"sampled devices, {node['wall_seconds']:.0f} s including start-up and the public teacher's training."
        )
    return "\n".join(lines) + "\n"


def soak(d: dict[str, Any]) -> str:
    """The restart soak (bench/soak.py): what was killed when, and what each device's ledger shows."""
    plan, link = d["plan"], d["superlink_restart"]
    lines = [
        "| round | replies / clients | dropped (who: reason) | seconds |",
        "| --- | --- | --- | --- |",
    ]
    for r in d["rounds"]:
        why = ", ".join(f"{k} ×{v}" for k, v in r["dropped"].items())
        who = f"{r['dropped_clients']}: {why}" if r["dropped_clients"] else "–"
        lines.append(f"| {r['round']} | {r['replies']} / {r['clients']} | {who} | {r['seconds']:.0f} |")
    kills = "; ".join(
        f"device {k['device']} in round {k['round']} ({k['moment']}, "
        f"{'charged' if k['charged_before_kill'] else 'not charged'} before the kill, back after "
        f"{k['down_seconds']:.0f} s and {k['restart_attempts']} start attempts)"
        for k in d["kills"]
    )
    lost = {dev: v["charged_not_answered"] for dev, v in d["devices"].items() if v["charged_not_answered"]}
    lines += [
        "",
        f"{plan['supernodes']} SuperNodes, {plan['rounds']} rounds, {d['wall_seconds'] / 60:.0f} min. `kill -9`: {kills}.",
    ]
    if link is not None:
        lines.append(
            f"SuperLink `kill -9` in round {link['round']} (after checkpoint {link['checkpointed_round']}), restarted "
            f"on the same port and database: the ServerApp {'died with it' if link['serverapp_died'] else 'survived'}."
        )
    if d["superlink_database_locked_errors"]:
        lines.append(
            f"The SuperLink's log holds {d['superlink_database_locked_errors']} `database is locked` errors "
            "(SQLite under load, answered with HTTP 500, which Flower 1.41's ServerApp does not retry)."
        )
    for r in d["resumes"]:
        lines.append(
            f"ServerApp died after checkpoint {r['after_round']} ({r['cause'] or 'exit ' + str(r['flwr_run_exit'])}): "
            f"the dead Flower run {'was stopped' if r['old_run_stopped'] else 'could not be stopped'} and a new "
            f"`flwr run` with `resume = true` continued from the checkpoint"
            f"{'' if r['resumed_from_checkpoint'] else ' (NOT confirmed by its log)'}."
        )
    lines.append(
        f"Charged on the device but the answer never reached the server (device: rounds): {lost or 'none'}; "
        f"flagged in results.json as unconfirmed: {d['unconfirmed_rounds'] or 'none'}. Checks: "
        + ", ".join(f"{name} {'✓' if ok else '✗'}" for name, ok in d["checks"].items())
        + "."
    )
    return "\n".join(lines) + "\n"


FRONTIER_LABELS = {
    "non-private": ("feddistill, mean of answers", "–"),
    "era": ("feddistill, ERA (DS-FL)", "–"),
    "median": ("feddistill, coordinate median", "–"),
    "trimmed-mean": ("feddistill, trimmed mean", "–"),
    "outlier-filtered": ("feddistill, outlier-filtered mean", "–"),
    "client-eps4": ("feddistill, GNMax votes, ε=4", "client"),
    "record-eps2": ("feddistill, DP-SGD on devices, ε=2", "record"),
    "record-eps8": ("feddistill, DP-SGD on devices, ε=8", "record"),
    "fedavg": ("Flower FedAvg, public pretraining", "–"),
    "fedavg-scratch": ("Flower FedAvg, from scratch", "–"),
    "dp-fedavg-eps4": ("Flower DP-FedAvg, ε=4, public pretraining", "client"),
    "dp-fedavg-scratch-eps4": ("Flower DP-FedAvg, ε=4, from scratch", "client"),
    "public_only": ("student from the public teacher alone (round 0)", "–"),
    "local_only": ("local-only (each client alone, mean over clients)", "–"),
    "centralized": ("centralized (all private data pooled, non-private)", "–"),
}
ALPHA_FREE = ("centralized",)  # pools the same private data whatever the partition


def _cell(cell: dict | None) -> str:
    if cell is None:
        return "–"
    if cell["n"] == 1:
        return f"{_pct(cell['mean'])} (1 seed)"
    return f"{_pct(cell['mean'])} ± {100 * cell['std']:.1f} ({cell['n']} seeds)"


def frontier(d: dict[str, Any]) -> str:
    table = d["table"]
    alphas = sorted(table, key=lambda a: -float(a[len("alpha") :]))
    head = " | ".join(f"α={a[len('alpha') :]}" for a in alphas)
    lines = [
        f"| method | unit of ε | {head} | upload / client-round |",
        "| --- | --- | " + " | ".join("---" for _ in alphas) + " | --- |",
    ]
    for method, (label, unit) in FRONTIER_LABELS.items():
        cells = [table[a].get(method) for a in alphas]
        if method in ALPHA_FREE:
            cells = [next((c for c in cells if c), None)] * len(cells)
        if not any(cells):
            continue
        up = next((c.get("bytes_per_client_round") for c in cells if c and c.get("bytes_per_client_round")), None)
        lines.append(f"| {label} | {unit} | " + " | ".join(_cell(c) for c in cells) + f" | {_kb(up)} |")
    lines += [
        "",
        "Mean ± sample standard deviation over seeds (each seed draws its own partition, client "
        "sampling, queries and noise). ε at δ=1e-5 (PLD). Centralized pools the same data for every α.",
        "",
        "Client-level ε=4, feddistill (GNMax) minus Flower DP-FedAvg, paired by seed, in points:",
        "",
    ]
    for gap in d["gap_points_client_eps4_vs_dp_fedavg"]:
        peer = "DP-FedAvg from scratch" if "scratch" in gap["peer"] else "DP-FedAvg with public pretraining"
        per_seed = " / ".join(f"{g:+.1f}" for g in gap["points_per_seed"])
        lines.append(
            f"- α={gap['alpha']:g}, vs {peer}: mean {gap['mean']:+.1f}, lowest {gap['min']:+.1f} (per seed: {per_seed})"
        )
    return "\n".join(lines) + "\n"


def short_function(name: str) -> str:
    """A profiler's function label, shorter: "<built-in method torch.conv2d>" -> "torch.conv2d"."""
    return re.sub(r"<(built-in )?method '?([\w.]+)'?.*>", r"\2", name)


def profile(d: dict[str, Any]) -> str:
    total = d["cpu_seconds"]
    lines = [
        f"{d['clients']} clients, {d['rounds']} rounds, in-process: {total:.0f} CPU s in all "
        f"({d['wall_seconds']:.0f} s wall).",
        "",
        "| where | CPU s (cumulative) | share |",
        "| --- | --- | --- |",
    ]
    for bucket, sec in d["cumulative_seconds"].items():
        lines.append(f"| {bucket} | {sec:.1f} | {100 * sec / total:.0f} % |")
    top = ", ".join(f"`{short_function(t['function'])}` {t['seconds']:.0f} s" for t in d["top_self_seconds"][:5])
    lines += ["", f"Hottest functions by own time: {top}."]
    return "\n".join(lines) + "\n"


def ceiling(d: dict[str, Any]) -> str:
    last = str(d["student_epochs"])
    lines = [
        f"No DP anywhere. The student ({last} server epochs on the {d['reference_rows']:,} reference rows, the last quarter "
        "at a tenth of the learning rate):",
        "",
        "| student trained from | its signal's accuracy | student test accuracy |",
        "| --- | --- | --- |",
        f"| the reference set's true labels (a perfect signal) | 100 % | {_pct(d['student_oracle'][last])} |",
        f"| the public teacher's signal | {_pct(d['public_teacher_signal_accuracy'])} | "
        f"{_pct(d['student_from_public_teacher'][last])} |",
        "",
    ]
    ensembles = d["ensembles"]
    counts = list(next(iter(next(iter(ensembles.values())).values())))
    lines += [
        f"The fleet's signal: every client trains from the round-0 student (test accuracy "
        f"{_pct(d['round0_student_test_accuracy'])}) and answers on {d['held_rows']:,} held reference rows; accuracy of the "
        f"aggregated answers with {', '.join(counts)} clients:",
        "",
        "| client recipe | a client alone (average) | " + " | ".join(ensembles[next(iter(ensembles))]) + " |",
        "| --- | --- | " + " | ".join("---" for _ in ensembles[next(iter(ensembles))]) + " |",
    ]
    for recipe, by_how in ensembles.items():
        cells = [" / ".join(_pct(v).replace(" %", "") for v in curve.values()) + " %" for curve in by_how.values()]
        lines.append(f"| {recipe} | {_pct(d['client_individual_accuracy'][recipe])} | " + " | ".join(cells) + " |")
    best = max(v for by_how in ensembles.values() for curve in by_how.values() for v in curve.values())
    lines += [
        "",
        f"Best aggregated signal: {_pct(best)}; the public teacher's alone: "
        f"{_pct(d['public_teacher_signal_accuracy'])} ({_pct(d['public_teacher_test_accuracy'])} on the test set: its labelled "
        "examples come from the reference set); issue 3's aim for the student: "
        f"{_pct(d['aim'])}.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the digits quick start
QUICKSTART_RUN = ROOT / "runs" / "quickstart"


def quickstart_summary(run_dir: Path, seconds: float | None = None) -> dict[str, Any]:
    """The README's quick-start figures, read from a finished quick-start run folder
    (``results.json``, and ``audit-report/audit.json`` when the audit ran); nothing else.
    ``seconds``: the wall time of the whole quick start, as scripts/quickstart.sh measured it."""
    from bench.common import environment

    run_dir = Path(run_dir)
    r = json.loads((run_dir / "results.json").read_text())
    if r.get("method") != "feddistill" or "centralized" not in r.get("baselines", {}):
        raise ValueError(f"{run_dir} is not a finished quick start with its baselines (bash scripts/quickstart.sh)")
    final, base, cfg = r["final"], r["baselines"], r["config"]
    out: dict[str, Any] = {
        "suite": "quickstart",
        "command": "bash scripts/quickstart.sh --record",
        "environment": environment(),
        "wall_seconds": seconds,
        "config": cfg,
        "config_digest": r.get("config_digest"),
        "validation_size": (r.get("validation") or {}).get("size", 0),
        "global_student": {
            "released_id": final.get("released_id"),
            "released_accuracy": final.get("released_accuracy"),
            "final_accuracy": final["student_accuracy"],
            "bytes_per_client_round": final["bytes_per_client_round"],
        },
        "public_teacher": {"model": r["public_teacher"]["model"], "accuracy": r["public_teacher"]["test_accuracy"]},
        "round0_student": {"accuracy": r["public_only_student"]["test_accuracy"]},
        "public_control": {"accuracy": base["public_control"]["accuracy"], "rounds": base["public_control"]["rounds"]},
        "local_only": {
            "accuracy": base["local_only"]["accuracy_mean"],
            "clients": len(base["local_only"]["clients_evaluated"]),
        },
        "centralized": {"accuracy": base["centralized"]["accuracy"]},
        "fedavg": {
            "accuracy": base["fedavg"]["accuracy"],
            "init": base["fedavg"]["init"],
            "bytes_per_client_round": base["fedavg"]["bytes_per_client_round"],
        }
        if "fedavg" in base
        else None,
        "private_gain_points": final["private_gain"],
        "gap_closed": final.get("gap_closed"),
        "fleet_labelled_rows": final.get("fleet_labelled_rows"),
        "audit": _quickstart_audit(run_dir / "audit-report" / "audit.json"),
    }
    return out


def _quickstart_audit(path: Path) -> dict[str, Any] | None:
    """The audit's headline figures: the best AUC and TPR at 0.1 % FPR over its targets, the
    largest empirical epsilon lower bound, DP violations and the policy's verdict."""
    if not path.is_file():
        return None
    a = json.loads(path.read_text())
    best = {
        name: t["attacks"][t["best_auc_attack"]]["summary"] for name, t in a["targets"].items() if not t.get("skipped")
    }
    top = max(best, key=lambda n: best[n]["auc"])
    return {
        "targets": len(best),
        "best_auc": best[top]["auc"],
        "best_auc_target": top,
        "max_tpr_at_0.1pct_fpr": max(s["tpr_at_fpr"]["0.001"]["tpr"] for s in best.values()),
        "max_epsilon_lower_bound": max(b["epsilon_lower_bound"] for b in a["epsilon_lower_bounds"]),
        "is_dp": a["is_dp"],
        "dp_violations": len(a["dp_violations"]),
        "passed": a["verdict"]["passed"],
        "seconds": a["timings_s"]["total"],
    }


def record_quickstart(run_dir: Path = QUICKSTART_RUN, results: Path = RESULTS, seconds: float | None = None) -> Path:
    """Write ``bench/results/quickstart/quickstart.json`` from a finished quick-start run folder."""
    path = results / "quickstart" / "quickstart.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(quickstart_summary(run_dir, seconds), indent=2) + "\n")
    return path


def quickstart(d: dict[str, Any]) -> str:
    c, g, fed = d["config"], d["global_student"], d["fedavg"]
    labelled, held = c["data"]["public_labelled_size"], d["validation_size"]
    acc = g["released_accuracy"] if g["released_id"] else g["final_accuracy"]
    took = f"{d['wall_seconds'] / 60:.1f} min" if d.get("wall_seconds") else "time not recorded"
    lines = [
        f"`{d['command']}` (seed {c['seed']}, {c['fleet']['num_clients']} clients, Dirichlet "
        f"α={c['fleet']['alpha']:g}, q={c['fleet']['fraction']:g}, {c['rounds']} rounds, "
        f"{c['distill']['server_student'].upper()} student; {d['environment']['cpus']} CPU cores, {took} "
        "for the recorded run, baselines, audit and report included):",
        "",
        "| method | test accuracy | upload / client-round |",
        "| --- | --- | --- |",
        f"| **feddistill global student** (released: {g['released_id'] or 'none'}) | **{_pct(acc)}** | "
        f"{_kb(g['bytes_per_client_round'])} |",
        f"| public teacher only (`{d['public_teacher']['model']}` on {labelled - held} labelled"
        + (f"; {held} held out for the release gate" if held else "")
        + f") | {_pct(d['public_teacher']['accuracy'])} | – |",
        f"| student distilled from the public teacher alone (round 0) | {_pct(d['round0_student']['accuracy'])} | – |",
        f"| **public-only control** (the same server pipeline, {d['public_control']['rounds']} rounds, no fleet "
        f"answers) | {_pct(d['public_control']['accuracy'])} | – |",
        f"| local-only (mean of {d['local_only']['clients']} clients) | {_pct(d['local_only']['accuracy'])} | – |",
        f"| centralized (pooled private data) | {_pct(d['centralized']['accuracy'])} | – |",
    ]
    if fed:
        init = f"pretrained on all {labelled} labelled" if fed["init"] == "public" else "from scratch"
        lines.append(
            f"| Flower FedAvg ({init}, same fleet and rounds) | {_pct(fed['accuracy'])} | "
            f"{_kb(fed['bytes_per_client_round'])} |"
        )
    lines += ["", _quickstart_prose(d, acc)]
    return "\n".join(lines) + "\n"


def _quickstart_prose(d: dict[str, Any], acc: float) -> str:
    g, fed, c = d["global_student"], d["fedavg"], d["config"]
    text = (
        f"Private gain (the global student − the public-only control): **{d['private_gain_points']:+.1f} points**"
        + (
            f"; gap closed between the control and pooling all private data: {100 * d['gap_closed']:.0f} %"
            if d.get("gap_closed") is not None
            else ""
        )
        + (
            f"; {d['fleet_labelled_rows']:,} of the {c['data']['reference_size']:,} reference rows carry the fleet's "
            "label"
            if d.get("fleet_labelled_rows") is not None
            else ""
        )
        + ". "
        f"The global student is {100 * (acc - d['local_only']['accuracy']):.1f} points above a client alone and "
        f"{100 * (d['centralized']['accuracy'] - acc):.1f} points below pooling all private data"
    )
    if fed:
        text += (
            f", and uploads {fed['bytes_per_client_round'] / g['bytes_per_client_round']:.1f}× less than FedAvg "
            "per client-round (FedAvg's accuracy moves between runs: Flower's FedAvg samples its clients at "
            "random; ours are seeded)"
        )
    text += "."
    if g["released_id"] and g["released_accuracy"] != g["final_accuracy"]:
        text += (
            f" The last round's student scored {_pct(g['final_accuracy'])}; the release gate kept "
            f"{g['released_id']} (private gain and gap closed are the last round's)."
        )
    a = d.get("audit")
    if a:
        verdict = "passed" if a["passed"] else "failed"
        claim = "" if a["is_dp"] else "; the run is not DP, so nothing is claimed"
        text += (
            f" The audit of the same run ({a['targets']} targets, {a['seconds']:.0f} s): best AUC {a['best_auc']:.2f} "
            f"({a['best_auc_target']}), TPR at 0.1 % FPR ≤ {a['max_tpr_at_0.1pct_fpr']:.3f}, largest empirical ε "
            f"lower bound {a['max_epsilon_lower_bound']:.2f} (membership targets and canaries), "
            f"{a['dp_violations']} DP violations{claim}; "
            f"policy {verdict}."
        )
    return text


def _signed(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:+.{digits}f}"


def headline(d: dict[str, Any]) -> str:
    rows = d["rows"]
    rounds = sorted({r["rounds"] for r in rows})
    seeds = sorted({s for r in rows for s in r["seeds"]})
    lines = [
        f"Fashion-MNIST core fleet (100 clients, Dirichlet α=0.5, q=0.1 Poisson), {', '.join(map(str, rounds))} "
        f"rounds, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; feddistill rows run "
        f"`{d['config']}`; ε at δ=1e-5 (PLD accountant); test accuracy on the 10,000 t10k images.",
        "",
        "| method | unit | ε | accuracy | public control | private gain (points) | gap closed | "
        "fleet-labelled rows | upload / client-round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        sd = f" ± {100 * r['accuracy_sd']:.1f}" if len(r["seeds"]) > 1 else ""
        gap = "–" if r["gap_closed_mean"] is None else f"{r['gap_closed_mean']:.2f}"
        labelled = "–" if r["fleet_labelled_rows_mean"] is None else f"{r['fleet_labelled_rows_mean']:,.0f}"
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:g}"
        lines.append(
            f"| {r['method']} | {r['unit'] or '–'} | {eps} | "
            f"{_pct(r['accuracy_mean'])}{sd} | {_pct(r['public_control_mean'])} | "
            f"{_signed(r['private_gain_mean'])} | {gap} | {labelled} | {_kb(r['bytes_per_client_round'])} |"
        )
    central = [r["centralized_mean"] for r in rows if r["centralized_mean"] is not None]
    if central:
        lines += ["", f"Centralized (the pooled private data, same student): {_pct(central[0])}."]
    return "\n".join(lines) + "\n"


def ablation(d: dict[str, Any]) -> str:
    s0, control = d["public_fixmatch_student"], d["control"]
    lines = [
        f"No DP, outside the federated loop, seed 0; every one of the 100 clients votes on every reference row. "
        f"S0 = FixMatch on the public data ({s0['steps']:,} steps): {_pct(s0['test_accuracy'])} on test, "
        f"{_pct(s0['reference_accuracy'])} on the reference rows. Students: S0 continued "
        f"{control['steps']:,} FixMatch steps; control (public labels only): {_pct(control['test_accuracy'])}.",
        "",
        "| fleet answers (cumulative) | rows labelled | label accuracy | S0 on the same rows | "
        "fleet right, S0 wrong | S0 right, fleet wrong | student | private gain (points) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in d["variants"]:
        lines.append(
            f"| {v['variant']} | {v['rows']:,} | {_pct(v['label_accuracy'])} | "
            f"{_pct(v['start_student_accuracy_on_them'])} | {v['fleet_right_start_wrong']:,} | "
            f"{v['start_right_fleet_wrong']:,} | {_pct(v['student_test_accuracy'])} | "
            f"{_signed(v['private_gain_points'])} |"
        )
    if d.get("consensus_threshold") is not None:
        lines += [
            "",
            f"The gate's share threshold, calibrated on the 100 held-out public labels to "
            f"{100 * d['knobs']['precision']:.0f} % precision: {d['consensus_threshold']:g}.",
        ]
    return "\n".join(lines) + "\n"


RENDER: dict[str, Callable[[dict[str, Any]], str]] = {
    "privacy": privacy,
    "faults": faults,
    "comms": comms,
    "audit": audit,
    "scale": scale,
    "deploy": deploy,
    "install": install,
    "frontier": frontier,
    "profile": profile,
    "ceiling": ceiling,
    "quickstart": quickstart,
    "headline": headline,
    "ablation": ablation,
    "soak": soak,
    "canary": canary,
}


def render(name: str, results: Path = RESULTS) -> str | None:
    path = results / {"soak": "deploy"}.get(name, name) / f"{name}.json"  # the soak reports with deploy
    return RENDER[name](json.loads(path.read_text())) if path.is_file() else None


def update(readme: Path = ROOT / "README.md", results: Path = RESULTS) -> list[str]:
    """Rewrite the README's bench blocks; return the names of the blocks written."""
    text, written = readme.read_text(), []

    def sub(m: re.Match) -> str:
        body = render(m.group("name"), results)
        if body is None:
            return m.group(0)
        written.append(m.group("name"))
        return m.group(1) + body + m.group(4)

    readme.write_text(BLOCK.sub(sub, text))
    return written


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.readme [--quickstart RUN_DIR [--seconds S]]``: record the quick start's
    figures from its run folder (scripts/quickstart.sh --record does), then rewrite the README's blocks."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.readme")
    parser.add_argument(
        "--quickstart",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="first write bench/results/quickstart/quickstart.json from this finished quick start",
    )
    parser.add_argument("--seconds", type=float, default=None, help="the quick start's wall time, to record with it")
    args = parser.parse_args(argv)
    if args.quickstart is not None:
        print("written:", record_quickstart(args.quickstart, seconds=args.seconds).relative_to(ROOT))
    print("README blocks written:", ", ".join(update()) or "none")


if __name__ == "__main__":
    main()
