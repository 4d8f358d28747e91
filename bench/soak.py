"""`python -m bench soak` (and part of `python -m bench deploy`): the restart soak.

A secure deployment on loopback (deploy-local: TLS, SuperNode authentication, signed
downloads, record-level DP on every device) runs a few rounds while the soak breaks it:

- ``kill -9`` of some SuperNodes (with the ClientApp processes they started) mid-round, either
  right after the device charged its ledger for the round (its reply is lost, its spend is
  not) or while it is still training (nothing charged), each restarted at once with the same
  key, data dir and state, as a supervisor would;
- ``kill -9`` of the SuperLink (with its SuperExec and the ServerApp under it) mid-round, and
  its restart on the same port with the same ``--database``; the dead Flower run is stopped
  (``flwr stop``) and the feddistill run continued from its last checkpoint by a new
  ``flwr run`` with ``resume = true``.

Then it checks (:func:`check_ledgers`): every round ran once in results.json; each device's
ledger holds one charge per time it trained, every charge is the event the run's public
parameters imply and its epsilon is what the accountant gives for them (every answer the
server kept was charged: nothing lost; no round charged more often than it was sent: nothing
counted twice); the server's reported epsilon for each device is its ledger's, or, where a
reply was lost after the charge, flagged by results.json's ``unconfirmed_rounds``; and
results.json records who dropped in which round. Bounded in time; every process is stopped.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import header, save_figure

log = logging.getLogger("bench.soak")

#: The run the soak breaks: digits, every device every round, record-level DP on the devices.
SOAK_RUN: dict[str, Any] = {
    "teacher.epochs": 20,
    "distill.digest-epochs": 2,
    "distill.revisit-epochs": 1,
    "distill.server-epochs": 2,
    "distill.query-size": 100,
    "fleet.fraction": 1.0,
    "privacy.record-level": True,
    "privacy.record-noise-multiplier": 1.0,
    # a killed node's reply never comes: Flower answers "node unavailable" once the node missed two
    # heartbeats (about 60 s); the timeout bounds a round whose node came back before that
    "simulation.round-timeout": 150.0,
    "simulation.node-wait-timeout": 300.0,
}
AFTER_CHARGE, MID_TRAINING = "after-charge", "mid-training"
#: how a dead run's `flwr run` log says why (first match wins)
DEATHS = (
    ("Connection to the SuperLink is unavailable", "the SuperLink went away"),
    ("500 Internal Server Error", "the SuperLink answered a ServerApp request with HTTP 500"),
    ("An unhandled exception occurred in the ServerApp", "an exception in the ServerApp"),
)


@dataclass(frozen=True)
class Fault:
    """``kill -9`` SuperNode `device` in `round`: right after it saved its charged ledger
    (``after-charge``) or while its ClientApp is running, before it saved (``mid-training``)."""

    round: int
    device: int
    moment: str = AFTER_CHARGE


@dataclass(frozen=True)
class SoakPlan:
    supernodes: int
    rounds: int
    faults: tuple[Fault, ...] = ()
    superlink_round: int | None = None  # kill -9 and restart the SuperLink mid-way through this round
    timeout_s: float = 3000.0


#: The issue's soak: 10 SuperNodes, 6 rounds, three SuperNodes and the SuperLink killed mid-round.
FULL = SoakPlan(
    supernodes=10,
    rounds=6,
    faults=(Fault(2, 1, AFTER_CHARGE), Fault(3, 4, MID_TRAINING), Fault(5, 7, AFTER_CHARGE)),
    superlink_round=4,
)
#: The default test suite's: 3 SuperNodes, 2 rounds, one killed after its round-2 charge.
SMALL = SoakPlan(supernodes=3, rounds=2, faults=(Fault(2, 0, AFTER_CHARGE),), timeout_s=600.0)


@dataclass
class Timeline:
    """What happened when, in seconds since the soak started (the PNG's events)."""

    t0: float = field(default_factory=time.monotonic)
    events: list[dict[str, Any]] = field(default_factory=list)

    def add(self, event: str, **info: Any) -> None:
        entry = {"t": round(time.monotonic() - self.t0, 2), "event": event, **info}
        self.events.append(entry)
        log.info("soak: %s", entry)


class Soak:
    """One soak on a fresh deployment folder `work` (see the module docstring)."""

    def __init__(self, work: Path, plan: SoakPlan, run: dict[str, Any] | None = None) -> None:
        from feddistill.deploy.local import LocalDeployment

        self.plan, self.work = plan, Path(work)
        self.run_dir = self.work / "run"
        self.deployment = LocalDeployment(self.work / "deployment", num_supernodes=plan.supernodes, config=run)
        self.timeline = Timeline()
        self.deadline = self.timeline.t0 + plan.timeout_s
        self.restarts: list[threading.Thread] = []
        self.kills: list[dict[str, Any]] = []
        self.superlink: dict[str, Any] | None = None
        self.resumes: list[dict[str, Any]] = []  # every time the ServerApp died and the run was resumed
        self.flwr_run: Any = None  # the current `flwr run` (LocalDeployment.launch)
        self.stream_lost: list[int] = []  # set while the current `flwr run` ended but its ServerApp lives
        self._checkpoint = (0, 0)  # (mtime_ns, round) of the checkpoint last read

    # ---- watching the run
    def checkpoint_round(self) -> int:
        """The last round the ServerApp checkpointed (0: none yet)."""
        import torch

        from feddistill.runfolder import RunFolder

        path = RunFolder(self.run_dir).checkpoint
        try:
            mtime = path.stat().st_mtime_ns
            if mtime != self._checkpoint[0]:
                rnd = int(torch.load(path, weights_only=False)["state"]["round"])
                self._checkpoint = (mtime, rnd)
                self.timeline.add("checkpoint", round=rnd)
        except (OSError, RuntimeError, EOFError, KeyError):  # not there yet, or being replaced
            pass
        return self._checkpoint[1]

    def state_written(self, device: int) -> int:
        """The mtime of device `device`'s state file (its student and ledger, written together
        after it trained): a stat, cheap enough to poll for a kill right after the charge."""
        from feddistill.runfolder import client_state_paths

        try:
            return client_state_paths(self.deployment.device_dir(device) / "state", device)[0].stat().st_mtime_ns
        except OSError:
            return 0

    def charges(self, device: int) -> int:
        """How many charges device `device`'s ledger holds now."""
        return len(device_ledger(self.deployment.device_dir(device), device))

    def wait_until(self, what: str, condition, poll_s: float = 0.1) -> None:
        while not condition():
            self.supervise()
            if time.monotonic() > self.deadline:
                raise TimeoutError(f"soak: gave up waiting for {what} after {self.plan.timeout_s:.0f} s")
            time.sleep(poll_s)

    def wait_round_started(self, rnd: int) -> None:
        self.wait_until(f"round {rnd}", lambda: self.checkpoint_round() >= rnd - 1)

    def training(self, device: int) -> bool:
        """Whether SuperNode `device` runs a ClientApp process now."""
        from feddistill.deploy.local import _descendants

        proc = self.deployment.supernodes.get(device)
        if proc is None:
            return False
        for pid in _descendants(proc.popen.pid):
            try:
                if b"clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                continue
        return False

    # ---- faults
    def kill_supernode(self, fault: Fault) -> None:
        self.wait_round_started(fault.round)
        before, written = self.charges(fault.device), self.state_written(fault.device)
        if fault.moment == AFTER_CHARGE:  # kill the moment its ledger holds the round's charge
            self.wait_until(
                f"device {fault.device}'s charge", lambda: self.state_written(fault.device) != written, 0.01
            )
        else:  # kill while it trains: its ClientApp runs, its ledger is not charged yet
            self.wait_until(f"device {fault.device} training", lambda: self.training(fault.device))
            time.sleep(1.0)
        self.deployment.kill_supernode(fault.device)
        kill = {**asdict(fault), "charged_before_kill": self.charges(fault.device) > before}
        self.kills.append(kill)
        self.timeline.add("kill -9 supernode", device=fault.device, round=fault.round, moment=fault.moment)
        thread = threading.Thread(target=self._restart, args=(fault.device, kill), daemon=True)
        thread.start()
        self.restarts.append(thread)

    def _restart(self, device: int, kill: dict[str, Any]) -> None:
        t = time.monotonic()
        kill["restart_attempts"] = self.deployment.restart_supernode(device)
        kill["down_seconds"] = round(time.monotonic() - t, 1)
        self.timeline.add("supernode back", device=device)

    def restart_superlink(self, rnd: int) -> None:
        """kill -9 the SuperLink mid-round `rnd` and start it again; the run it carried is resumed
        by :meth:`supervise` once its `flwr run` has noticed."""
        self.wait_round_started(rnd)
        base = {i: self.state_written(i) for i in range(self.plan.supernodes)}
        self.wait_until(f"a charge in round {rnd}", lambda: any(self.state_written(i) != t for i, t in base.items()))
        died_before = len(self.resumes)
        self.deployment.restart_superlink(kill=True)
        self.superlink = {"round": rnd, "checkpointed_round": self.checkpoint_round()}
        self.timeline.add("kill -9 superlink, restarted", round=rnd)
        try:  # its `flwr run --stream` loses the SuperLink and exits
            self.flwr_run.popen.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        self.supervise()
        self.superlink["serverapp_died"] = len(self.resumes) > died_before

    def serverapp_alive(self) -> bool:
        """Whether a ServerApp process runs under the SuperLink (its SuperExec starts one per run)."""
        from feddistill.deploy.local import _alive, _descendants

        link = self.deployment.superlink
        if link is None:
            return False
        for pid in _descendants(link.popen.pid):
            try:
                if b"serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes() and _alive(pid):
                    return True
            except OSError:
                continue
        return False

    def supervise(self) -> None:
        """What an operator does when a run's ServerApp died (its `flwr run` ended without
        results.json): stop the dead Flower run and resume the run from its last checkpoint."""
        from feddistill.deploy.local import run_id_of
        from feddistill.runfolder import RunFolder

        proc = self.flwr_run
        if proc is None or proc.popen.poll() is None or RunFolder(self.run_dir).results.is_file():
            return
        if self.serverapp_alive():  # only `flwr run`'s log stream ended (seen under load): keep waiting
            if not self.stream_lost:
                self.stream_lost.append(self.checkpoint_round())
                self.timeline.add("flwr run stream ended, ServerApp still running")
            return
        if len(self.resumes) >= 5:
            raise RuntimeError(f"soak: the ServerApp died {len(self.resumes) + 1} times; see {proc.log}")
        self.stream_lost.clear()
        tail = proc.tail(200_000)
        tail = tail[tail.rfind("\n$ ") + 1 :]  # this attempt's part of the (appended) log
        old_run = run_id_of(proc)
        resume = {
            "after_round": self.checkpoint_round(),
            "old_run_id": old_run,
            "flwr_run_exit": proc.popen.returncode,
            "cause": next((why for text, why in DEATHS if text in tail), f"flwr run exit {proc.popen.returncode}"),
            "old_run_stopped": old_run is not None and self.deployment.stop_run(old_run),
        }
        self.resumes.append(resume)
        self.flwr_run = self.deployment.launch(rounds=self.plan.rounds, output_dir=self.run_dir, resume=True)
        self.timeline.add("flwr run resume=true", after_round=resume["after_round"])

    # ---- the whole soak
    def run(self) -> dict[str, Any]:
        dep = self.deployment
        with dep:
            dep.start()
            self.timeline.add("deployment up", supernodes=self.plan.supernodes)
            self.flwr_run = dep.launch(rounds=self.plan.rounds, output_dir=self.run_dir)
            steps = sorted(
                [(f.round, 0, f) for f in self.plan.faults]
                + ([(self.plan.superlink_round, 1, None)] if self.plan.superlink_round else []),
                key=lambda s: (s[0], s[1]),
            )
            for rnd, _, fault in steps:
                if fault is not None:
                    self.kill_supernode(fault)
                else:
                    self.restart_superlink(rnd)
            results_file = self.run_dir / "results.json"
            self.wait_until("results.json", results_file.is_file)
            results = dep.wait_results(self.flwr_run, self.run_dir, max(1.0, self.deadline - time.monotonic()))
            self.timeline.add("results.json written", rounds=len(results["rounds"]))
            for thread in self.restarts:
                thread.join(timeout=max(1.0, self.deadline - time.monotonic()))
            ledgers = {i: device_ledger(dep.device_dir(i), i) for i in range(self.plan.supernodes)}
            resume_log = dep.last_run["log"]
        return self.summary(results, ledgers, resume_log)

    def summary(self, results: dict[str, Any], ledgers: dict[int, Any], resume_log: str) -> dict[str, Any]:
        from feddistill.config import parse_config

        cfg = parse_config({**self.deployment.run_config, "rounds": self.plan.rounds}, "soak config")
        resumed_log = Path(resume_log).read_text(errors="replace") if self.resumes else ""
        for resume in self.resumes:  # the log of every resumed ServerApp says where it started
            resume["resumed_from_checkpoint"] = f"after round {resume['after_round']}" in resumed_log
        # the round a ServerApp died in was sent again by the resumed one
        checks = check_ledgers(results, ledgers, cfg, [r["after_round"] + 1 for r in self.resumes])
        return {
            "plan": {**asdict(self.plan), "faults": [asdict(f) for f in self.plan.faults]},
            "run": self.deployment.run_config,
            "rounds": [
                {k: r[k] for k in ("round", "clients", "replies", "dropped", "dropped_clients", "seconds")}
                for r in results["rounds"]
            ],
            "kills": self.kills,
            "superlink_restart": self.superlink,
            "resumes": self.resumes,
            # SQLite contention in the SuperLink (HTTP 500s; Flower's ServerApp does not retry them)
            "superlink_database_locked_errors": self.deployment.logs.joinpath("superlink.log")
            .read_text(errors="replace")
            .count("database is locked"),
            "devices": checks["devices"],
            "checks": checks["checks"],
            "passed": all(checks["checks"].values()),
            "unconfirmed_rounds": results["privacy"]["record_level"]["unconfirmed_rounds"],
            "final_accuracy": results["final"]["student_accuracy"],
            "wall_seconds": round(time.monotonic() - self.timeline.t0, 1),
            "timeline": self.timeline.events,
        }


def device_ledger(device_dir: Path, device: int):
    """The record-level ledger a device keeps in its data dir (empty before its first charge)."""
    from feddistill.client.state import load_state
    from feddistill.privacy.ledger import PrivacyLedger

    saved = load_state(Path(device_dir) / "state", device, 10**9).ledger_json
    if saved is None:
        return PrivacyLedger(unit="record", delta=0.5, target_epsilon=None, mechanism="none yet").history
    return PrivacyLedger.from_json(saved).history


def record_event(cfg):
    """One round of DP-SGD on a device, from the run's public parameters only."""
    from feddistill.privacy.accounting import GaussianEvent
    from feddistill.privacy.dpsgd import dpsgd_schedule
    from feddistill.privacy.plan import record_noise_multiplier

    rate, steps = dpsgd_schedule(cfg.privacy.record_sampling_rate, cfg.distill.revisit_epochs)
    return GaussianEvent(record_noise_multiplier(cfg, rate, steps), rate, steps)


def implied_epsilon(cfg, charges: int) -> float:
    """The record-level epsilon of `charges` rounds of DP-SGD as the run's public parameters
    define them (the accountant the devices use, recomputed here, not read from a ledger)."""
    from feddistill.privacy.ledger import PrivacyLedger
    from feddistill.privacy.plan import record_mechanism

    ledger = PrivacyLedger(
        unit="record", delta=cfg.privacy.record_delta, target_epsilon=None, mechanism=record_mechanism(cfg)
    )
    for rnd in range(charges):
        ledger.record(record_event(cfg), rnd)
    return ledger.epsilon()


def check_ledgers(results: dict[str, Any], histories: dict[int, list], cfg, reruns: list[int]) -> dict[str, Any]:
    """Each device's ledger against results.json (see the module docstring); `histories` are the
    devices' ledger entries, `reruns` the rounds sent again, once per time (a ServerApp died in them)."""
    from feddistill.privacy.ledger import PrivacyLedger

    reported = results["privacy"]["record_level"]["devices"]
    unconfirmed = results["privacy"]["record_level"]["unconfirmed_rounds"]
    rounds = results["rounds"]
    devices, checks = {}, {}
    checks["every round once"] = [r["round"] for r in rounds] == list(range(1, cfg.rounds + 1))
    checks["replies plus dropped add up"] = all(
        r["replies"] + sum(r["dropped"].values()) == r["clients"] for r in rounds
    )
    expected = record_event(cfg)
    ok = {
        "nothing lost": True,
        "nothing counted twice": True,
        "epsilon as implied": True,
        "server not under-reporting": True,
    }
    for device, history in sorted(histories.items()):
        charged = Counter(entry.round for entry in history)
        answered = [r["round"] for r in rounds if device not in r["dropped_clients"]]
        sent = Counter([r["round"] for r in rounds] + list(reruns))
        ledger = PrivacyLedger(
            unit="record", delta=cfg.privacy.record_delta, target_epsilon=None, mechanism="soak", history=history
        )
        epsilon, implied = ledger.epsilon(), implied_epsilon(cfg, len(history))
        server = reported.get(str(device), {}).get("record-epsilon")
        flagged = unconfirmed.get(str(device), [])
        ok["nothing lost"] &= all(charged[r] >= 1 for r in answered)
        ok["nothing counted twice"] &= all(n <= sent[r] for r, n in charged.items())
        ok["epsilon as implied"] &= abs(epsilon - implied) <= 1e-9 * max(1.0, implied) and all(
            entry.event == expected for entry in history
        )
        # the server's figure is the ledger's, or it says which rounds it may be missing
        shown = 0.0 if server is None else server  # no report yet: the server claims nothing spent
        ok["server not under-reporting"] &= abs(shown - epsilon) <= 1e-9 * max(1.0, epsilon) or (
            shown < epsilon and bool(flagged)
        )
        devices[str(device)] = {
            "charged_rounds": sorted(charged.elements()),
            "answered_rounds": answered,
            "charged_not_answered": sorted((charged - Counter(answered)).elements()),
            "ledger_epsilon": epsilon,
            "implied_epsilon": implied,
            "server_reported_epsilon": server,
            "unconfirmed_rounds": flagged,
        }
    checks.update(ok)
    return {"devices": devices, "checks": checks}


def plot_timeline(summary: dict[str, Any], path: Path) -> None:
    """Devices (rows) against time: kills, restarts, checkpoints and the SuperLink restart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    n = summary["plan"]["supernodes"]
    for e in summary["timeline"]:
        if e["event"] == "checkpoint":
            ax.axvline(e["t"], color="0.8", lw=1)
            ax.text(e["t"], n - 0.4, f"r{e['round']}", fontsize=8, color="0.4", ha="right")
        elif e["event"].startswith("kill -9 superlink"):
            ax.axvline(e["t"], color="tab:red", lw=2, ls="--", label="SuperLink kill -9 + restart")
        elif e["event"] == "flwr run resume=true":
            ax.axvline(e["t"], color="tab:green", lw=2, ls=":", label="flwr run, resume = true")
    for kill in summary["kills"]:
        down = next(
            e["t"] for e in summary["timeline"] if e["event"] == "kill -9 supernode" and e["device"] == kill["device"]
        )
        back = down + kill.get("down_seconds", 0)
        ax.plot([down, back], [kill["device"]] * 2, color="tab:red", lw=4, solid_capstyle="butt")
        ax.text(down, kill["device"] + 0.25, f"kill -9 ({kill['moment']}, round {kill['round']})", fontsize=8)
    ax.set_yticks(range(n))
    ax.set_ylim(-0.5, n)
    ax.set_xlabel("seconds since the deployment started")
    ax.set_ylabel("SuperNode (device)")
    verdict = "all checks passed" if summary["passed"] else "CHECKS FAILED"
    ax.set_title(f"Restart soak: {n} SuperNodes, {summary['plan']['rounds']} rounds, TLS + node auth ({verdict})")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(dict(zip(labels, handles)).values(), dict(zip(labels, handles)).keys(), loc="lower right", fontsize=8)
    save_figure(fig, path)


def run_soak(plan: SoakPlan, work: Path | None = None, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """One soak in `work` (a temp dir by default, removed when the soak passed)."""
    from feddistill.config import flat_run_config

    temp = work is None
    work = Path(tempfile.mkdtemp(prefix="feddistill-soak-")) if work is None else Path(work)
    summary = Soak(work, plan, {**SOAK_RUN, **flat_run_config(run or {})}).run()
    if temp and summary["passed"]:
        shutil.rmtree(work, ignore_errors=True)
    else:
        summary["work_dir"] = str(work)
    return summary


def soak(out: Path, overrides: dict) -> dict:
    """The full soak (:data:`FULL`); writes ``out/soak.json`` and ``out/soak.png``."""
    plan = FULL
    if "supernodes" in overrides or "rounds" in overrides:
        plan = SoakPlan(
            supernodes=int(overrides.get("supernodes", FULL.supernodes)),
            rounds=int(overrides.get("rounds", FULL.rounds)),
            faults=FULL.faults,
            superlink_round=FULL.superlink_round,
        )
    run = {k: v for k, v in overrides.items() if k not in ("supernodes", "rounds")}
    summary = {**header("soak", overrides), **run_soak(plan, run=run)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(summary, indent=2))
    plot_timeline(summary, out / "soak.png")
    return summary
