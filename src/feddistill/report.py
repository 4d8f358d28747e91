"""Readable summaries and plots of a run's results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


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


def print_summary(results: dict[str, Any], console: Console) -> None:
    cfg = results["config"]
    console.rule(
        f"feddistill: {cfg['data']['dataset']}, {cfg['fleet']['num_clients']} clients "
        f"({cfg['fleet']['partition']}, alpha={cfg['fleet']['alpha']}), aggregator {cfg['distill']['aggregator']}"
    )
    rounds = Table(title="Rounds", show_edge=False)
    for col in ("round", "clients", "answers", "teacher signal acc", "student acc", "student ECE", "agreement", "uploaded"):
        rounds.add_column(col, justify="right")
    for r in results["rounds"]:
        rounds.add_row(
            str(r["round"]),
            str(r["clients"]),
            str(r["replies"]),
            _pct(r["teacher_accuracy"]),
            _pct(r["student_accuracy"]),
            f"{r['student_ece']:.3f}",
            _pct(r["agreement"]),
            _bytes(r["bytes_uploaded"]),
        )
    console.print(rounds)

    final, base = results["final"], results.get("baselines", {})
    table = Table(title="Global student vs baselines (test accuracy)", show_edge=False)
    table.add_column("method")
    table.add_column("accuracy", justify="right")
    table.add_column("upload / client-round", justify="right")
    table.add_row("[bold]feddistill global student[/]", f"[bold]{_pct(final['student_accuracy'])}[/]",
                  _bytes(final["bytes_per_client_round"]))
    table.add_row("public teacher only", _pct(results["public_teacher"]["test_accuracy"]), "-")
    table.add_row("student from public teacher only (round 0)", _pct(results["public_only_student"]["test_accuracy"]), "-")
    if "local_only" in base:
        lo = base["local_only"]
        table.add_row(f"local-only (mean of {len(lo['clients_evaluated'])} clients)", _pct(lo["accuracy_mean"]), "-")
    if "centralized" in base:
        table.add_row("centralized (pooled private data)", _pct(base["centralized"]["accuracy"]), "-")
    if "fedavg" in base:
        fa = base["fedavg"]
        table.add_row(f"Flower FedAvg ({fa['init']} init)", _pct(fa["accuracy"]), _bytes(fa["bytes_per_client_round"]))
    if "dp_fedavg" in base:
        dp = base["dp_fedavg"]
        table.add_row(f"Flower DP-FedAvg (client-level eps={dp['privacy']['epsilon']:.2f})", _pct(dp["accuracy"]),
                      _bytes(dp["bytes_per_client_round"]))
    console.print(table)
    for key, label in (("client_level", "client-level"), ("record_level", "record-level")):
        p = (results.get("privacy") or {}).get(key)
        if p and p.get("epsilon") is not None:
            console.print(f"privacy ({label}): epsilon = {p['epsilon']:.3f} at delta = {p['delta']:g}, unit: {p['unit']}, "
                          f"accountant: {p['accountant']}, mechanism: {p['mechanism']}")
    if "fedavg" in base and final["bytes_per_client_round"]:
        ratio = base["fedavg"]["bytes_per_client_round"] / final["bytes_per_client_round"]
        console.print(f"upload per client-round: {ratio:.1f}x less than FedAvg")
    dropped = sum(sum(r["dropped"].values()) for r in results["rounds"])
    if dropped:
        console.print(f"[yellow]{dropped} replies dropped by validation (reasons in results.json)[/]")


def plot_accuracy(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in results["rounds"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([0, *rounds], [results["public_only_student"]["test_accuracy"]] + [r["student_accuracy"] for r in results["rounds"]],
            "o-", label="feddistill global student (test)")
    teacher = [(r["round"], r["teacher_accuracy"]) for r in results["rounds"] if r["teacher_accuracy"] is not None]
    if teacher:
        ax.plot(*zip(*teacher), "s--", alpha=0.7, label="ensemble teacher signal (queried reference rows)")
    base = results.get("baselines", {})
    if "fedavg" in base and base["fedavg"]["rounds"]:
        ax.plot([r["round"] for r in base["fedavg"]["rounds"]], [r["student_accuracy"] for r in base["fedavg"]["rounds"]],
                "^-", label="Flower FedAvg (test)")
    lines = [("public teacher only", results["public_teacher"]["test_accuracy"], "gray")]
    if "local_only" in base:
        lines.append(("local-only (mean)", base["local_only"]["accuracy_mean"], "red"))
    if "centralized" in base:
        lines.append(("centralized", base["centralized"]["accuracy"], "green"))
    for label, value, color in lines:
        ax.axhline(value, color=color, linestyle=":", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    cfg = results["config"]
    ax.set_title(f"{cfg['data']['dataset']}, {cfg['fleet']['num_clients']} clients, {cfg['fleet']['partition']} alpha={cfg['fleet']['alpha']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
