"""`python -m bench scale`: time per round and peak RSS (whole process tree) for 10, 100, 1000 and
10,000 clients, and the orchestration overhead: the same 100-client run on Flower's simulation
engine vs in-process (bench/inprocess.py), measured in the same benchmark."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from bench.common import NO_BASELINES, header, save_figure, settings

# The 1000-client fleet: 50 private images per client; lighter rounds than the core fleet
# (500 queries, 2 digest epochs, 1 revisit epoch) so that 100 clients per round fit 2 cores.
SCALE = {
    **NO_BASELINES,
    "rounds": 10,
    "distill.query_size": 500,
    "distill.digest_epochs": 2,
    "distill.revisit_epochs": 1,
}
# 10,000 clients share the same 50,000 private images (5 each): q = 0.01 keeps about 100 clients per
# round (as 1000 at q = 0.1), and IID because Dirichlet(0.5) cannot give each of them one image
# (no draw in 1000 tries does)
PER_SIZE = {10_000: {"fleet.fraction": 0.01, "fleet.partition": "iid"}}


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
        "fraction": cfg.fleet.fraction,
        "partition": cfg.fleet.partition,
        "rounds": len(per_round),
        "engine": "in-process loop" if in_process else "Flower simulation (Ray)",
        # Flower rows measured before feddistill.simulations.linkstate lack this: --keep re-measures them
        **({} if in_process else {"linkstate": "indexed"}),
        "wall_seconds": seconds,
        "round_seconds_mean": sum(per_round) / len(per_round),
        "round_seconds": per_round,
        # data, public teacher, node start-up and identification, final evaluation: all but the rounds
        "outside_rounds_seconds": seconds - sum(per_round),
        "peak_rss_gib": rss.peak_bytes / 2**30,
        "accuracy": results["final"]["student_accuracy"],
    }
    logging.info(
        "%s: %.0f s, %.1f s/round, peak RSS %.2f GiB", name, seconds, row["round_seconds_mean"], row["peak_rss_gib"]
    )
    return row


def scale(out: Path, overrides: dict) -> dict:
    base = {**SCALE, **overrides}
    sizes = [int(n) for n in str(base.pop("sizes", "10,100,1000,10000")).split(",")]
    if 100 not in sizes:
        raise SystemExit("scale: the overhead ratio is measured at 100 clients; include 100 in --set sizes")
    # --keep: rows of an earlier scale.json with the same settings are kept, only missing sizes run
    earlier = out / "scale.json"
    kept = json.loads(earlier.read_text()) if earlier.is_file() else {}
    rows = dict(kept.get("runs", {})) if kept.get("config") == settings(base) else {}
    rows = {k: r for k, r in rows.items() if r["engine"] == "in-process loop" or r.get("linkstate") == "indexed"}
    # the largest fleet first (the longest run), the in-process twin right after flower-100;
    # the JSON is rewritten after every run
    plan = [(f"flower-{n}", n, False) for n in sorted(set(sizes), reverse=True)]
    plan.insert(plan.index(("flower-100", 100, False)) + 1, ("inprocess-100", 100, True))
    summary = {}
    for name, n, in_process in plan:
        if name not in rows:
            run = {**base, "fleet.num_clients": n, **PER_SIZE.get(n, {})}
            rows[name] = _timed_run(out, name, run, in_process=in_process)
        summary = _scale_summary(out, overrides, base, rows)
    return summary


def _scale_summary(out: Path, overrides: dict, base: dict, rows: dict) -> dict:
    summary = {
        **header("scale", overrides),
        "config": settings(base),
        "per_size": {str(n): o for n, o in PER_SIZE.items()},
        "runs": dict(sorted(rows.items(), key=lambda kv: (kv[1]["clients"], kv[0]))),
    }
    if "flower-100" in rows and "inprocess-100" in rows:
        flower, bare = rows["flower-100"], rows["inprocess-100"]
        summary["overhead_ratio_per_round"] = flower["round_seconds_mean"] / bare["round_seconds_mean"]
        summary["overhead_ratio_wall"] = flower["wall_seconds"] / bare["wall_seconds"]
    sizes = sorted(r["clients"] for k, r in rows.items() if k.startswith("flower-"))
    plot_scale(rows, sizes, out / "scale.png")
    (out / "scale.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_scale(rows: dict, sizes: list[int], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    a.plot(sizes, [rows[f"flower-{n}"]["round_seconds_mean"] for n in sizes], "o-", label="Flower simulation")
    if "inprocess-100" in rows:
        a.plot([100], [rows["inprocess-100"]["round_seconds_mean"]], "s", label="in-process loop")
    b.plot(sizes, [rows[f"flower-{n}"]["peak_rss_gib"] for n in sizes], "o-")
    for ax, label in ((a, "seconds per round"), (b, "peak RSS, process tree (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("clients (q = 0.1; 10,000: q = 0.01)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for n in sizes:  # a run stopped at a deadline (its rounds so far) says so on the figure
        row = rows[f"flower-{n}"]
        if row.get("stopped_after_round"):
            note = f"{row['stopped_after_round']} of {row['rounds_planned']} rounds"
            a.annotate(note, (n, row["round_seconds_mean"]), ha="right", va="bottom")
    b.set_ylim(1, 10)
    b.set_yticks([1, 2, 4, 8])
    a.legend(fontsize=8, loc="upper left")
    fig.suptitle("Fashion-MNIST simulation on 2 cores")
    save_figure(fig, path)
