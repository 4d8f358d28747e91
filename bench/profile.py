"""`python -m bench profile`: where a round's CPU time goes (cProfile of a core-fleet run on the
in-process grid), by client and server step, and the hottest functions."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import NO_BASELINES, header, save_figure, settings

# Where a round's time goes: (function, caller or None for every caller), cumulative CPU time.
# Inference runs under torch.no_grad, whose wrapper hides the caller one level down.
PROFILED = {
    "client: whole message": ("client/distill.py:handle_distill", None),
    "client: digest (KD toward the signal on the queries)": (
        "training.py:train_distill",
        "client/distill.py:handle_distill",
    ),
    "client: revisit (private data, plus KD)": ("training.py:train_revisit", None),
    "client: inference on the queries": ("_contextlib.py:decorate_context", "client/distill.py:handle_distill"),
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
    from feddistill.data.fleet import load_fleet
    from feddistill.server.app import run_distillation, teacher_and_validation

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
    a.set_title(
        f"{summary['rounds']} rounds, {summary['clients']} clients: {summary['cpu_seconds']:.0f} CPU s in all",
        fontsize=9,
    )
    top = summary["top_self_seconds"][:12]
    b.barh(
        [short_function(t["function"])[-45:] for t in top][::-1], [t["seconds"] for t in top][::-1], color="tab:orange"
    )
    b.set_xlabel("self CPU seconds")
    b.set_title("hottest functions (own time)", fontsize=9)
    for ax in (a, b):
        ax.tick_params(axis="y", labelsize=7)
    save_figure(fig, path)
