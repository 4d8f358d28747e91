"""A deployment that survives restarts (bench/soak.py): real SuperLink and SuperNodes on
127.0.0.1 (TLS, node auth, signed downloads, record-level DP on the devices), SuperNodes and the
SuperLink killed with SIGKILL mid-round and restarted. Bounded in time; every process is stopped.

Both soaks are marked slow (minutes of waiting on round timeouts; the default suite stays
under 10 minutes) and run with ``pytest -m slow tests/test_deploy_soak.py``: the small one kills
one of 3 SuperNodes right after it charged its ledger in the last round; the full one (10
SuperNodes, 6 rounds, 3 SuperNodes and the SuperLink killed, the run resumed with
``resume = true``) is what ``python -m bench soak`` runs and reports. The ledger checks they rely
on are tested here in the default suite, on ledgers written by hand.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from bench.soak import FULL, SMALL, check_ledgers, implied_epsilon, run_soak

from feddistill.config import parse_config
from test_deploy import _processes_mentioning

VENV_BIN = Path(sys.executable).parent
deploy = pytest.mark.skipif(
    not (VENV_BIN / "flower-superlink").exists() or os.environ.get("FEDDISTILL_SKIP_DEPLOY") == "1",
    reason="flower-superlink not available (or FEDDISTILL_SKIP_DEPLOY=1)",
)
FAST = {"teacher.epochs": 5, "simulation.round-timeout": 120.0}  # bounds the round the kill is in


def _assert_soak(summary: dict, work: Path) -> None:
    assert summary["checks"] == {name: True for name in summary["checks"]}, summary["devices"]
    assert summary["passed"]
    for kill in summary["kills"]:
        record = summary["rounds"][kill["round"] - 1]
        assert kill["device"] in record["dropped_clients"], (kill, record)  # who dropped, and when
        device = summary["devices"][str(kill["device"])]
        if kill["charged_before_kill"]:  # its reply was lost, its spend was not
            assert kill["round"] in device["charged_rounds"] and kill["round"] not in device["answered_rounds"]
    assert _processes_mentioning(str(work)) == []


@deploy
@pytest.mark.slow
def test_a_supernode_killed_after_its_charge_comes_back_and_its_ledger_stays_honest(tmp_path):
    summary = run_soak(SMALL, work=tmp_path, run=FAST)
    _assert_soak(summary, tmp_path)
    killed = summary["kills"][0]
    assert killed["charged_before_kill"] and killed["restart_attempts"] >= 1
    # killed in the last round: no later answer carries its charge, so the server flags the round
    device = summary["devices"][str(killed["device"])]
    assert device["ledger_epsilon"] > device["server_reported_epsilon"]
    assert summary["unconfirmed_rounds"][str(killed["device"])] == [SMALL.rounds]


@deploy
@pytest.mark.slow
def test_full_restart_soak_ten_supernodes_superlink_restart_and_resume(tmp_path):
    summary = run_soak(FULL, work=tmp_path)
    _assert_soak(summary, tmp_path)
    assert summary["superlink_restart"]["serverapp_died"]
    assert summary["resumes"] and all(r["resumed_from_checkpoint"] for r in summary["resumes"])
    assert len(summary["kills"]) == 3 and len(summary["rounds"]) == FULL.rounds


# --------------------------------------------------------------------------- #
# the checks themselves, on made-up results: they must fail when a ledger lies
# --------------------------------------------------------------------------- #
CFG = parse_config({"rounds": 2, "privacy.record-level": True, "privacy.record-noise-multiplier": 1.0}, "test")


def _entries(rounds: list[int]):
    from bench.soak import record_event

    from feddistill.privacy.ledger import LedgerEntry

    return [LedgerEntry(record_event(CFG), r) for r in rounds]


def _results(reported: dict, unconfirmed: dict, dropped_in_2: list[int]) -> dict:
    rounds = [
        {"round": 1, "clients": 2, "replies": 2, "dropped": {}, "dropped_clients": []},
        {"round": 2, "clients": 2, "replies": 2 - len(dropped_in_2), "dropped": {"no reply": len(dropped_in_2)}},
    ]
    rounds[1]["dropped_clients"] = dropped_in_2
    devices = {k: {"record-epsilon": v} for k, v in reported.items()}
    return {"rounds": rounds, "privacy": {"record_level": {"devices": devices, "unconfirmed_rounds": unconfirmed}}}


def test_check_ledgers_accepts_an_honest_fleet_and_catches_lost_and_double_charges():
    one, two = implied_epsilon(CFG, 1), implied_epsilon(CFG, 2)
    assert 0 < one < two
    honest = _results({"0": two, "1": one}, {"1": [2]}, [1])  # device 1 charged round 2, its reply was lost
    got = check_ledgers(honest, {0: _entries([1, 2]), 1: _entries([1, 2])}, CFG, [])
    assert all(got["checks"].values()), got
    assert got["devices"]["1"]["charged_not_answered"] == [2]
    # a kept answer the device never charged: lost
    lost = check_ledgers(honest, {0: _entries([1]), 1: _entries([1, 2])}, CFG, [])["checks"]
    assert not lost["nothing lost"]
    # a round charged twice though sent once; allowed when the round was re-run after a resume
    twice = {0: _entries([1, 2, 2]), 1: _entries([1, 2])}
    assert not check_ledgers(honest, twice, CFG, [])["checks"]["nothing counted twice"]
    assert check_ledgers(honest, twice, CFG, [2])["checks"]["nothing counted twice"]
    thrice = {0: _entries([1, 2, 2, 2]), 1: _entries([1, 2])}  # re-run once, charged three times
    assert not check_ledgers(honest, thrice, CFG, [2])["checks"]["nothing counted twice"]
    # a device the server never heard from: honest only while its rounds are flagged
    unheard = _results({"0": two}, {"1": [1, 2]}, [1])
    unheard["rounds"][0]["dropped_clients"] = [1]
    assert check_ledgers(unheard, {0: _entries([1, 2]), 1: _entries([1, 2])}, CFG, [])["checks"][
        "server not under-reporting"
    ]
    unheard["privacy"]["record_level"]["unconfirmed_rounds"] = {}
    assert not check_ledgers(unheard, {0: _entries([1, 2]), 1: _entries([1, 2])}, CFG, [])["checks"][
        "server not under-reporting"
    ]
    # the server reporting less than the ledger without flagging the round: under-reporting
    silent = _results({"0": two, "1": one}, {}, [1])
    assert not check_ledgers(silent, {0: _entries([1, 2]), 1: _entries([1, 2])}, CFG, [])["checks"][
        "server not under-reporting"
    ]


def test_a_request_nothing_answered_counts_as_no_reply_but_flowers_error_reply_does_not():
    """Flower's "node unavailable" error reply comes from the SuperLink's node id (1), not from the
    node asked: requests are matched to replies by message id, so it is counted once, as an error."""
    from flwr.app import Error, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from feddistill import protocol
    from feddistill.server.loop import count_silent
    from feddistill.strategies.base import RoundReplies

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    sent = []
    for node in (5, 6, 7):
        msg = Message(RecordDict(), dst_node_id=node, message_type=protocol.DISTILL)
        msg.metadata.__dict__["_message_id"] = f"request-{node}"  # as Flower's grid sets it when pushing
        sent.append(msg)
    unavailable = Message(Error(0, "Node Unavailable"), reply_to=sent[1])
    unavailable.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's
    replies = [Message(RecordDict(), reply_to=sent[0]), unavailable]
    collected = RoundReplies()
    count_silent(collected, sent, replies, rnd=3)
    assert collected.dropped == {"no reply": 1}  # node 7 only
    collected = RoundReplies()
    count_silent(collected, sent, [*replies, Message(RecordDict(), reply_to=sent[2])], rnd=3)
    assert collected.dropped == {}


def test_resume_is_a_run_config_switch_that_leaves_the_config_hash_alone():
    """`flwr run` resumes with run config ``resume = true``: the checkpoint (keyed by the config hash)
    must still match, a peer run (no checkpoint) refuses it, and `feddistill simulate` points to --resume."""
    import subprocess

    from feddistill.config import ConfigError, load_config
    from feddistill.server.app import refuse_scenarios

    first, again = load_config(None, {"rounds": 3}), load_config(None, {"rounds": 3, "resume": True})
    assert again.resume and first.digest() == again.digest()
    refuse_scenarios(again)  # feddistill: allowed
    with pytest.raises(ConfigError, match="fedavg run has no checkpoint"):
        refuse_scenarios(load_config(None, {"method": "fedavg", "resume": True}))
    proc = subprocess.run(
        [sys.executable, "-m", "feddistill.cli", "simulate", "--set", "resume=true"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--resume RUN_DIR" in proc.stderr
