"""Readable summaries and plots of a run's results.json, read through its typed records
(``feddistill.runfolder.RunResults``: the rounds, the final block, the baselines, privacy)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from feddistill.atomic import atomic_path, read_json
from feddistill.runfolder import (
    AUDIT_JSON,
    AUDIT_MARKDOWN,
    REPORT_HTML,
    Baselines,
    ResultsFormatError,
    RoundRecord,
    RunFolder,
    RunResults,
)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "-"


def _baselines(res: RunResults) -> Baselines:
    return res.baselines if "baselines" in res else Baselines()


def _claims(res: RunResults) -> dict[str, Any]:
    return res.privacy.claims() if res.privacy is not None else {}


def _rounds_table(res: RunResults) -> Table:
    """One row per round: participation, accuracies, calibration and upload size."""
    rounds = Table(title="Rounds", show_edge=False)
    for col in (
        "round",
        "clients",
        "answers",
        "teacher signal acc",
        "student acc",
        "student ECE",
        "agreement",
        "uploaded",
    ):
        rounds.add_column(col, justify="right")
    for r in res.rounds:
        rounds.add_row(
            str(r.round),
            str(r.clients),
            str(r.replies),
            _pct(r.teacher_accuracy),
            _pct(r.student_accuracy),
            f"{r.student_ece:.3f}",
            _pct(r.agreement),
            _bytes(r.bytes_uploaded),
        )
    return rounds


def print_summary(results: RunResults | dict[str, Any], console: Console) -> None:
    res = RunResults.coerce(results)
    cfg = res.config
    console.rule(
        f"feddistill: {cfg['data']['dataset']}, {cfg['fleet']['num_clients']} clients "
        f"({cfg['fleet']['partition']}, alpha={cfg['fleet']['alpha']}), aggregator {cfg['distill']['aggregator']}"
    )
    console.print(_rounds_table(res))

    final, base = res.final, _baselines(res)
    table = Table(title="Global student vs baselines (test accuracy)", show_edge=False)
    table.add_column("method")
    table.add_column("accuracy", justify="right")
    table.add_column("upload / client-round", justify="right")
    table.add_row(
        "[bold]feddistill global student[/]",
        f"[bold]{_pct(final.student_accuracy)}[/]",
        _bytes(final.bytes_per_client_round),
    )
    table.add_row("public teacher only", _pct(res.public_teacher["test_accuracy"]), "-")
    table.add_row("student from public teacher only (round 0)", _pct(res.public_only_student["test_accuracy"]), "-")
    if "public_control" in base:
        table.add_row(
            "public-only control (same server pipeline, no fleet)", _pct(base.public_control["accuracy"]), "-"
        )
    if "local_only" in base:
        lo = base.local_only
        table.add_row(f"local-only (mean of {len(lo['clients_evaluated'])} clients)", _pct(lo["accuracy_mean"]), "-")
    if "centralized" in base:
        table.add_row("centralized (pooled private data)", _pct(base.centralized["accuracy"]), "-")
    if "fedavg" in base:
        fa = base.fedavg
        table.add_row(f"Flower FedAvg ({fa['init']} init)", _pct(fa["accuracy"]), _bytes(fa["bytes_per_client_round"]))
    if "dp_fedavg" in base:
        dp = base.dp_fedavg
        table.add_row(
            f"Flower DP-FedAvg (client-level eps={dp['privacy']['epsilon']:.2f})",
            _pct(dp["accuracy"]),
            _bytes(dp["bytes_per_client_round"]),
        )
    console.print(table)
    if final.private_gain is not None:
        closed = final.gap_closed
        console.print(
            f"private data's gain over the public-only control: {final.private_gain:+.1f} points"
            + ("" if closed is None else f", {closed:.0%} of the gap to centralized closed")
            + f"; {final.get('fleet_labelled_rows', 0)} reference rows labelled by the fleet"
        )
    for key, label in (("client_level", "client-level"), ("record_level", "record-level")):
        p = _claims(res).get(key)
        if p is not None and p.epsilon is not None:
            console.print(
                f"privacy ({label}): epsilon = {p.epsilon:.3f} at delta = {p.delta:g}, unit: {p.unit}, "
                f"accountant: {p.accountant}, mechanism: {p.mechanism}"
            )
    if "fedavg" in base and final.bytes_per_client_round:
        ratio = base.fedavg["bytes_per_client_round"] / final.bytes_per_client_round
        console.print(f"upload per client-round: {ratio:.1f}x less than FedAvg")
    dropped = sum(sum(r.dropped.values()) for r in res.rounds)
    if dropped:
        console.print(f"[yellow]{dropped} replies dropped by validation (reasons in results.json)[/]")


def _reference_lines(ax, res: RunResults, base: Baselines) -> None:
    """Horizontal lines for the public teacher and the local-only and centralized baselines."""
    lines = [("public teacher only", res.public_teacher["test_accuracy"], "gray")]
    if "local_only" in base:
        lines.append(("local-only (mean)", base.local_only["accuracy_mean"], "red"))
    if "centralized" in base:
        lines.append(("centralized", base.centralized["accuracy"], "green"))
    for label, value, color in lines:
        ax.axhline(value, color=color, linestyle=":", label=label)


def plot_accuracy(results: RunResults | dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = RunResults.coerce(results)
    rounds = [r.round for r in res.rounds]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(
        [0, *rounds],
        [res.public_only_student["test_accuracy"]] + [r.student_accuracy for r in res.rounds],
        "o-",
        label="feddistill global student (test)",
    )
    base = _baselines(res)
    control = base.public_control
    if control is not None:
        ax.plot(
            range(len(control["per_round"])),
            control["per_round"],
            "k.-",
            alpha=0.6,
            label="public-only control (same pipeline, no fleet)",
        )
    teacher = [(r.round, r.teacher_accuracy) for r in res.rounds if r.teacher_accuracy is not None]
    if teacher:
        ax.plot(*zip(*teacher), "s--", alpha=0.7, label="ensemble teacher signal (queried reference rows)")
    if "fedavg" in base and base.fedavg["rounds"]:
        ax.plot(
            [r["round"] for r in base.fedavg["rounds"]],
            [r["student_accuracy"] for r in base.fedavg["rounds"]],
            "^-",
            label="Flower FedAvg (test)",
        )
    _reference_lines(ax, res, base)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    cfg = res.config
    ax.set_title(
        f"{cfg['data']['dataset']}, {cfg['fleet']['num_clients']} clients, "
        f"{cfg['fleet']['partition']} alpha={cfg['fleet']['alpha']}"
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


# ---- the self-contained HTML run report (`feddistill report RUN_DIR`) ----


class ReportError(RuntimeError):
    """The run folder has no readable results.json."""


# the blocks of results.json every section reads (besides the rounds)
_REPORT_NEEDS = ("final", "public_teacher", "public_only_student")

REPORT_SECTIONS = (
    "summary",
    "accuracy",
    "privacy",
    "communication",
    "faults",
    "releases",
    "drift",
    "calibration",
    "export",
    "audit",
)


def _figure_data_uri(fig) -> str:
    import base64
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _accuracy_figure(res: RunResults) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = res.rounds
    xs = [r.round for r in rounds]
    ax.plot(
        [0, *xs],
        [res.public_only_student["test_accuracy"]] + [r.student_accuracy for r in rounds],
        "o-",
        label="candidate global student (test)",
    )
    if all("released_accuracy" in r for r in rounds):
        ax.step(
            xs,
            [r.released_accuracy for r in rounds],
            where="post",
            color="black",
            linewidth=2,
            alpha=0.6,
            label="released student (test)",
        )
    teacher = [(r.round, r.teacher_accuracy) for r in rounds if r.teacher_accuracy is not None]
    if teacher:
        ax.plot(*zip(*teacher), "s--", alpha=0.7, label="teacher signal (queried reference rows)")
    base = _baselines(res)
    for key, label in (("fedavg", "Flower FedAvg"), ("dp_fedavg", "Flower DP-FedAvg")):
        if key in base and base[key].get("rounds"):
            ax.plot(
                [r["round"] for r in base[key]["rounds"]],
                [r["student_accuracy"] for r in base[key]["rounds"]],
                "^-",
                alpha=0.8,
                label=f"{label} (test)",
            )
    _reference_lines(ax, res, base)
    ax.set(xlabel="round", ylabel="accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _figure_data_uri(fig)


def _series_figure(
    xs,
    series: dict[str, list],
    ylabel: str,
    *,
    kind: str = "line",
    threshold: float | None = None,
    marks: list[int] | None = None,
) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    bottom = [0.0] * len(xs)
    for label, ys in series.items():
        if kind == "bar":
            ax.bar(xs, ys, bottom=bottom, label=label)
            bottom = [b + y for b, y in zip(bottom, ys)]
        else:
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=label)
    if threshold:
        ax.axhline(threshold, color="red", linestyle="--", label=f"alert threshold {threshold:g}")
    for x in marks or []:
        ax.axvline(x, color="orange", alpha=0.5)
    ax.set(xlabel="round", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    return _figure_data_uri(fig)


def _per_class_figure(rounds: list[RoundRecord]) -> str | None:
    rows = [r.per_class_accuracy for r in rounds]
    if not rows or any(r is None for r in rows):
        return None
    import numpy as np

    plt = _plt()
    data = np.array([[np.nan if a is None else a for a in r] for r in rows], dtype=float).T
    fig, ax = plt.subplots(figsize=(7, 3.2))
    im = ax.imshow(
        data,
        aspect="auto",
        vmin=0,
        vmax=1,
        cmap="viridis",
        extent=(rounds[0].round - 0.5, rounds[-1].round + 0.5, data.shape[0] - 0.5, -0.5),
    )
    ax.set(xlabel="round", ylabel="class", title="student per-class test accuracy")
    fig.colorbar(im, ax=ax)
    return _figure_data_uri(fig)


def _reliability_figure(calibration: dict[str, Any]) -> str | None:
    rel = calibration.get("reliability_test")
    if not rel:
        return None
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, (label, d) in zip(
        axes, (("before (T = 1)", rel["before"]), (f"after (T = {calibration['temperature']:.2f})", rel["after"]))
    ):
        edges = np.asarray(d["edges"])
        acc = np.where(np.asarray(d["count"]) > 0, d["accuracy"], 0.0)
        ax.bar(edges[:-1], acc, width=np.diff(edges), align="edge", edgecolor="black", alpha=0.7)
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=label)
    return _figure_data_uri(fig)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _f(x: Any, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _calibration_decision(cal: dict[str, Any]) -> str:
    """Whether the fitted T was kept, on what evidence (empty for results written before the
    decision was recorded)."""
    crit = cal.get("criterion") or {}
    if "kept" not in cal or "before" not in crit:
        return ""
    n = cal.get("validation_size", "?")
    held_out = (
        f"held-out {crit['name'].upper()} ({crit['estimate']}, {n} examples) "
        f"{crit['before']:.3f} at T = 1, {crit['after']:.3f} at the fitted T"
    )
    if cal["kept"]:
        return f"; kept: {held_out}"
    return f"; the fitted T = {cal['fitted_temperature']:.3f} was not kept (T = 1): {held_out}"


def build_html_report(results: RunResults | dict[str, Any], run_dir: Path) -> str:
    """The report as one HTML string: every figure is an inline PNG data URI, no external asset."""
    from html import escape

    res = RunResults.coerce(results)
    sections = {key: _SECTION_BUILDERS[key](res, RunFolder(run_dir)) for key in REPORT_SECTIONS}
    titles = {
        "summary": "Summary",
        "accuracy": "Accuracy per round",
        "privacy": "Privacy: epsilon spent per round",
        "communication": "Bytes uploaded",
        "faults": "Dropped replies and dropouts",
        "releases": "Releases and rollbacks",
        "drift": "Drift",
        "calibration": "Calibration",
        "export": "Device export",
        "audit": "Audit",
    }
    body = "".join(f'<section id="{key}"><h2>{titles[key]}</h2>{sections[key]}</section>' for key in REPORT_SECTIONS)
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0;font-size:0.85em}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}img{max-width:100%}"
    )
    title = f"feddistill run report: {escape(str(run_dir))}"
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head><body><h1>{title}</h1>{body}</body></html>"
    )


def _summary_section(res: RunResults, run: RunFolder) -> str:
    rounds, cfg, final = res.rounds, res.config, res.final
    summary_rows = [
        [
            "dataset / clients",
            f"{cfg['data']['dataset']}, {cfg['fleet']['num_clients']} clients "
            f"({cfg['fleet']['partition']}), {len(rounds)} rounds",
        ],
        ["aggregator", cfg["distill"]["aggregator"]],
        ["released student", f"{final.get('released_id', '-')} (test accuracy {_pct(final.released_accuracy)})"],
        ["last candidate student", f"test accuracy {_pct(final.student_accuracy)}"],
        ["public teacher only", _pct(res.public_teacher["test_accuracy"])],
        ["config hash", res.get("config_digest", "-")],
        ["reference-set digest", res.get("reference_digest", "-")],
    ]
    if res.stop_reason:
        summary_rows.append(["stopped early", res.stop_reason])
    return _table(["", ""], summary_rows)


def _accuracy_section(res: RunResults, run: RunFolder) -> str:
    final = res.final
    base = _baselines(res)
    base_rows = [
        ["feddistill released student", _pct(final.released_accuracy)],
        ["feddistill last candidate", _pct(final.student_accuracy)],
        ["public teacher only", _pct(res.public_teacher["test_accuracy"])],
        ["student from public teacher only (round 0)", _pct(res.public_only_student["test_accuracy"])],
    ]
    if "public_control" in base:
        closed = final.gap_closed
        base_rows.append(
            [
                "public-only control (same server pipeline, no fleet)",
                f"{_pct(base.public_control['accuracy'])}; private gain {final['private_gain']:+.1f} "
                f"points"
                + ("" if closed is None else f", gap to centralized closed {closed:.0%}")
                + f"; {final.get('fleet_labelled_rows', 0):,} fleet-labelled rows",
            ]
        )
    if "local_only" in base:
        base_rows.append(["local-only (mean)", _pct(base.local_only["accuracy_mean"])])
    if "centralized" in base:
        base_rows.append(["centralized", _pct(base.centralized["accuracy"])])
    for key, label in (("fedavg", "Flower FedAvg"), ("dp_fedavg", "Flower DP-FedAvg")):
        if key in base:
            base_rows.append([label, _pct(base[key]["accuracy"])])
    return f'<img alt="accuracy per round" src="{_accuracy_figure(res)}">' + _table(
        ["method", "test accuracy"], base_rows
    )


def _privacy_section(res: RunResults, run: RunFolder) -> str:
    from html import escape

    rounds = res.rounds
    xs = [r.round for r in rounds]
    claims = _claims(res)
    lines = []
    for key, label in (("client_level", "client-level"), ("record_level", "record-level")):
        p = claims.get(key)
        if p is not None and p.epsilon is not None:
            lines.append(
                f"<p>{label}: &epsilon; = {p.epsilon:.3f} at &delta; = {p.delta:g}; unit: "
                f"{escape(str(p.unit))}; mechanism: {escape(str(p.mechanism))}; "
                f"accountant: {escape(str(p.accountant))}</p>"
            )
    eps_series = {}
    if any(r.client_epsilon is not None for r in rounds):
        eps_series["client-level epsilon (cumulative)"] = [r.client_epsilon for r in rounds]
    releases = _releases(res)
    by_round = {rel["round"]: rel for rel in releases}
    if any(rel.get("record_epsilon") is not None for rel in releases):
        eps_series["record-level epsilon (largest device)"] = [by_round.get(x, {}).get("record_epsilon") for x in xs]
    if eps_series:
        return "".join(lines) + f'<img alt="epsilon per round" src="{_series_figure(xs, eps_series, "epsilon")}">'
    return (
        "<p>No differential privacy in this run (privacy.client-level = off, no record-level DP): "
        "no &epsilon; is claimed.</p>"
    )


def _releases(res: RunResults) -> list[dict[str, Any]]:
    return (res.releases or {}).get("releases", [])


def _communication_section(res: RunResults, run: RunFolder) -> str:
    rounds, final = res.rounds, res.final
    xs = [r.round for r in rounds]
    figure = _series_figure(xs, {"bytes uploaded": [r["bytes_uploaded"] for r in rounds]}, "bytes", kind="bar")
    return (
        f'<img alt="bytes per round" src="{figure}">'
        f"<p>total {_bytes(final.bytes_uploaded_total)}, {_bytes(final.bytes_per_client_round)} per client-round</p>"
    )


def _faults_section(res: RunResults, run: RunFolder) -> str:
    rounds = res.rounds
    xs = [r.round for r in rounds]
    reasons = sorted({k for r in rounds for k in r["dropped"]})
    fault_series = {reason: [r["dropped"].get(reason, 0) for r in rounds] for reason in reasons}
    if any(r.over_budget_skipped for r in rounds):
        fault_series["skipped: over budget"] = [r.get("over_budget_skipped", 0) for r in rounds]
    fault_rows = [
        [r.round, r["clients"], r["replies"], sum(r["dropped"].values()), r.get("over_budget_skipped", 0)]
        for r in rounds
    ]
    return (
        (
            f'<img alt="drops per round" src="{_series_figure(xs, fault_series, "replies", kind="bar")}">'
            if fault_series
            else "<p>No reply was dropped and no client dropped out.</p>"
        )
        + (
            _table(["reason", "replies (all rounds)"], [[k, sum(v)] for k, v in fault_series.items()])
            if fault_series
            else ""
        )
        + _table(["round", "clients asked", "answers kept", "dropped (incl. dropouts)", "skipped (budget)"], fault_rows)
    )


def _releases_section(res: RunResults, run: RunFolder) -> str:
    from html import escape

    releases = _releases(res)
    if not releases:
        return "<p>This run has no release history.</p>"
    rel_rows = [
        [
            rel["id"],
            rel["round"],
            rel.get("parent") or "-",
            rel["status"],
            _f(rel["validation"].get("accuracy")),
            _f(rel["validation"].get("ece")),
            _f(rel["validation"].get("agreement")),
            _f(rel["test"].get("accuracy")),
            _f((rel.get("calibration") or {}).get("temperature"), "{:.2f}"),
            _f(rel.get("client_epsilon")),
            rel["reason"],
        ]
        for rel in releases
    ]
    rollbacks = [rel["id"] for rel in releases if rel["status"] != "promoted"]
    return (
        f"<p>Released now: <b>{escape(str(res['releases'].get('current')))}</b>. "
        f"{len(releases) - len(rollbacks)} promoted, {len(rollbacks)} rejected (rollback to the previous release)"
        f"{': ' + escape(', '.join(rollbacks)) if rollbacks else ''}. Validation = "
        f"{escape(str((res.validation or {}).get('split', 'public validation split')))}.</p>"
        + _table(
            [
                "id",
                "round",
                "parent",
                "status",
                "val acc",
                "val ECE",
                "agreement",
                "test acc",
                "T",
                "client eps",
                "gate's reason",
            ],
            rel_rows,
        )
    )


def _drift_section(res: RunResults, run: RunFolder) -> str:
    rounds = res.rounds
    xs = [r.round for r in rounds]
    drift = res.drift or {}
    threshold = drift.get("kl_threshold")
    alerts = [r.round for r in rounds if r.drift_alert]
    drift_html = ""
    if any("drift_kl" in r for r in rounds):
        series = {
            "KL(new || previous teacher signal)": [r.drift_kl for r in rounds],
            "teacher-student agreement": [r["agreement"] for r in rounds],
        }
        figure = _series_figure(xs, series, "KL / agreement", threshold=threshold, marks=alerts)
        drift_html += f'<img alt="drift per round" src="{figure}">'
    per_class = _per_class_figure(rounds)
    if per_class:
        drift_html += f'<img alt="per-class accuracy" src="{per_class}">'
    drift_html += (
        _table(["round", "alert"], [[r.round, r.drift_alert] for r in rounds if r.drift_alert])
        if alerts
        else f"<p>No drift alert (threshold {_f(threshold, '{:g}')}).</p>"
    )
    return drift_html


def _calibration_section(res: RunResults, run: RunFolder) -> str:
    from html import escape

    cal = res.calibration
    if not cal:
        return "<p>The released student was not calibrated (release.calibrate = false).</p>"
    cal_rows = [
        [
            split,
            _f(cal["before"][split]["ece"]),
            _f(cal["after"][split]["ece"]),
            _f(cal["before"][split]["nll"]),
            _f(cal["after"][split]["nll"]),
        ]
        for split in cal["before"]
    ]
    fig = _reliability_figure(cal)
    return (
        f"<p>Temperature scaling of release {escape(str(res.final.get('released_id')))}: "
        f"T = {cal['temperature']:.3f}, fitted on the {escape(cal['fitted_on'])}{_calibration_decision(cal)}.</p>"
        + _table(["split", "ECE before", "ECE after", "NLL before", "NLL after"], cal_rows)
        + (f'<img alt="reliability diagram" src="{fig}">' if fig else "")
    )


def _export_section(res: RunResults, run: RunFolder) -> str:
    exports = run.export_metadata()
    if not exports:
        return "<p>No device export yet: <code>feddistill export RUN_DIR --release ID</code>.</p>"
    rows = []
    for path in exports:
        try:
            meta = json.loads(path.read_text())
            for name, form in meta["forms"].items():
                rows.append(
                    [
                        meta["release"],
                        name,
                        f"{form['bytes'] / 1000:.1f} KB",
                        _f(form["test_accuracy"]),
                        f"{form['accuracy_delta_vs_fp32']:+.3f}",
                        _f(form["latency"]["p50_ms"]),
                        _f(form["latency"]["p95_ms"]),
                    ]
                )
        except (json.JSONDecodeError, KeyError, TypeError):
            rows.append([path.parent.name, f"unreadable {path.name}", "", "", "", "", ""])
    return _table(["release", "form", "size", "test acc", "delta vs fp32", "p50 ms", "p95 ms"], rows)


def _deployment_audit(run: RunFolder) -> str:
    """The privacy officer's deployment audit, when one ran: claimed vs estimated epsilon, verdict, links."""
    try:
        audit = json.loads((run.audit_deployment / AUDIT_JSON).read_text())
        claimed, estimated = audit["claimed_epsilon"], audit["estimated_epsilon"]
        passed = audit["verdict"]["passed"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return ""
    report, data = run.audit_deployment_link(AUDIT_MARKDOWN), run.audit_deployment_link(AUDIT_JSON)
    claim = "none" if claimed is None else f"{claimed:.3g}"
    estimate = "unbounded (> 100)" if estimated is None else f"{estimated:.3g}"
    return (
        f"<p>Deployment audit (canary clients): claimed client-level ε {claim}, estimated ε {estimate}; "
        f'policy: <b>{"passed" if passed else "FAILED"}</b>. <a href="{report}">{report}</a>'
        f' (<a href="{data}">{AUDIT_JSON}</a>).</p>'
    )


def _audit_section(res: RunResults, run: RunFolder) -> str:
    audit_dir = run.audit_report
    deployment = _deployment_audit(run)
    if not (audit_dir / AUDIT_MARKDOWN).is_file():
        if deployment:
            return deployment
        return "<p>No audit has run on this folder: <code>feddistill audit RUN_DIR</code>.</p>"
    verdict = ""
    try:
        audit = json.loads((audit_dir / AUDIT_JSON).read_text())
        passed = (audit.get("verdict") or {}).get("passed")
        verdict = "" if passed is None else (" Policy: <b>passed</b>." if passed else " Policy: <b>FAILED</b>.")
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    report, data = run.audit_report_link(AUDIT_MARKDOWN), run.audit_report_link(AUDIT_JSON)
    return (
        f'<p>Membership-inference audit: <a href="{report}">{report}</a>'
        f' (<a href="{data}">{AUDIT_JSON}</a>).{verdict}</p>' + deployment
    )


# one builder per section of REPORT_SECTIONS, called in that order: (results, run folder) -> HTML
_SECTION_BUILDERS = {
    "summary": _summary_section,
    "accuracy": _accuracy_section,
    "privacy": _privacy_section,
    "communication": _communication_section,
    "faults": _faults_section,
    "releases": _releases_section,
    "drift": _drift_section,
    "calibration": _calibration_section,
    "export": _export_section,
    "audit": _audit_section,
}


def write_html_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run's HTML report to ``out`` (default RUN_DIR/report.html); ReportError names
    what is wrong: no readable results, or an ``out`` that cannot be the report file."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    target = Path(out) if out is not None else run.report_html
    if target.is_dir():  # checked first: the figures take seconds to draw
        raise ReportError(f"{target}: is a directory; --out takes the HTML file to write, e.g. {target / REPORT_HTML}")
    path = run.results
    results = read_json(path, ReportError, f"is {run_dir} the folder of a finished feddistill run?")
    if not isinstance(results, dict) or results.get("method") != "feddistill" or "rounds" not in results:
        raise ReportError(
            f"{path}: not the results of a feddistill run (method {results.get('method')!r})"
            if isinstance(results, dict)
            else f"{path}: not a results object"
        )
    try:
        res = RunResults.from_dict(results)
        for block in _REPORT_NEEDS:
            if block not in res:
                raise KeyError(block)
        html = build_html_report(res, run_dir)
    except (KeyError, TypeError) as exc:
        raise ReportError(f"{path}: missing or malformed field {exc} (written by an older feddistill?)") from exc
    except ResultsFormatError as exc:
        raise ReportError(f"{path}: {exc} (written by an older feddistill?)") from exc
    try:
        with atomic_path(target) as tmp:
            tmp.write_text(html, encoding="utf-8")
    except OSError as exc:  # a parent that is a file, a read-only folder, a full disk
        raise ReportError(f"{target}: cannot write the report ({exc.strerror or type(exc).__name__})") from None
    return target
