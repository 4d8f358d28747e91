"""End to end: a hostile node sends, round after round, each failing reply of issue 15 (items 3-5).

A real Flower simulation (`flwr.simulation.run_simulation`, Ray backend) with feddistill's own
ServerApp and a ClientApp built with Flower's `ClientApp`: two honest nodes answer with
`handle_distill`, the third answers honestly too and then rewrites its reply into one of the
reported failing cases. The run must complete; every hostile reply must be dropped with its
reason (logged, counted in results.json's `dropped`); the honest devices' record-level ledger
entries must be what their own ledgers say, whatever the hostile node claims.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from feddistill import protocol
from feddistill.config import RunConfig, load_config
from test_simulation import ONE_CLIENT_ACTOR

pytestmark = pytest.mark.e2e(seconds=40)

HOSTILE = 2  # partition id of the hostile node

FAST = {
    "data.reference_size": 200,
    "data.public_labelled_size": 60,
    "data.test_size": 100,
    "fleet.num_clients": 3,
    "fleet.fraction": 1.0,
    "teacher.epochs": 10,
    "distill.digest_epochs": 1,
    "distill.revisit_epochs": 1,
    "distill.server_epochs": 1,
    "distill.query_size": 50,
    "privacy.record_level": True,  # so that every honest reply carries its device's record-epsilon
    "privacy.record_noise_multiplier": 1.0,
}
# Flower's Ray backend as feddistill.simulations.run sets it up, with one client actor
BACKEND = {
    "client_resources": {"num_cpus": ONE_CLIENT_ACTOR["simulation.cpus_per_client"], "num_gpus": 0.0},
    "init_args": {"logging_level": "ERROR", "log_to_driver": False},
}


def _meta(key, value):
    def edit(content: RecordDict) -> None:
        content.config_records[protocol.REPLY_META][key] = value

    return edit


def _metric(key, value):
    def edit(content: RecordDict) -> None:
        content.metric_records[protocol.METRICS_RECORD][key] = value

    return edit


def _answers(edit_wire):
    def edit(content: RecordDict) -> None:
        record = content.array_records[protocol.ANSWERS_RECORD]
        record[protocol.ANSWERS] = Array(np.ascontiguousarray(edit_wire(record[protocol.ANSWERS].numpy())))

    return edit


def _trailing(content: RecordDict) -> None:
    array = content.array_records[protocol.ANSWERS_RECORD][protocol.ANSWERS]
    array.data = array.data + b"\x00" * 1_048_576


def _extra_config(content: RecordDict) -> None:
    content["meta2"] = ConfigRecord({protocol.ROUND: 1, "partition-id": 0})


def _claim_client_zero(content: RecordDict) -> None:
    _meta("partition-id", 0)(content)
    _metric(protocol.RECORD_EPSILON, 0.0)(content)  # ... and a lower epsilon for "its" ledger entry


# (what the hostile node does, the reason phrase the server must count it under), one per round
CASES = [
    (_meta("partition-id", "zero"), "unexpected meta key"),
    (_meta("partition-id", [0, 1]), "unexpected meta key"),
    (_meta("partition-id", math.nan), "unexpected meta key"),
    (_meta("partition-id", math.inf), "unexpected meta key"),
    (_metric("num-examples", [1.0]), "unexpected metric"),
    (_metric(protocol.RECORD_EPSILON, [0.0, 0.0]), "bad record-epsilon"),
    (_extra_config, "unexpected config record"),
    (_metric("revisit-loss", [0.5] * 50_000), "unexpected metric"),
    (_trailing, "trailing bytes after the .npy"),
    (_answers(np.zeros_like), "rows not probability distributions"),
    (_answers(np.ones_like), "rows not probability distributions"),
    (_claim_client_zero, "unexpected meta key"),
]


def hostile_client_app(cfg: RunConfig, node_file: str) -> ClientApp:
    """feddistill's ClientApp, except that partition HOSTILE rewrites its distill reply into
    CASES[round - 1] (and writes its Flower node id to `node_file` when asked who it is)."""
    from feddistill.client.distill import handle_distill
    from feddistill.client.node import device_id, is_device

    app = ClientApp()

    @app.train("distill")
    def distill(msg: Message, context: Context) -> Message:
        reply = handle_distill(msg, context, cfg)
        if device_id(context) != HOSTILE or reply.has_error():
            return reply
        rnd = int(msg.content.config_records[protocol.CONFIG_RECORD][protocol.ROUND])
        CASES[rnd - 1][0](reply.content)
        return reply

    @app.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        if device_id(context) == HOSTILE:
            with open(node_file, "w") as f:
                f.write(str(context.node_id))
        meta = ConfigRecord({protocol.PARTITION: device_id(context), protocol.DEVICE: int(is_device(context))})
        return Message(RecordDict({protocol.REPLY_META: meta}), reply_to=msg)

    return app


def _run(cfg: RunConfig, client_app: ClientApp) -> None:
    from flwr.simulation import run_simulation

    from feddistill.server.app import make_server_app

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    run_simulation(
        server_app=make_server_app(cfg),
        client_app=client_app,
        num_supernodes=cfg.fleet.num_clients,
        backend_config=BACKEND,
    )


def test_hostile_node_is_dropped_every_round_and_cannot_touch_other_ledgers(tmp_path, caplog):
    import json

    from feddistill.client.state import load_state, state_dir
    from feddistill.privacy.ledger import PrivacyLedger

    cfg = load_config(None, {**FAST, "rounds": len(CASES), "output_dir": str(tmp_path / "run")})
    node_file = tmp_path / "hostile-node"
    with caplog.at_level(logging.WARNING, logger="feddistill"):
        _run(cfg, hostile_client_app(cfg, str(node_file)))
    results = json.loads((tmp_path / "run" / "results.json").read_text())  # the run completed
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, len(CASES) + 1))
    for record, (_, reason) in zip(rounds, CASES):
        assert record["clients"] == 3 and record["replies"] == 2, record  # the two honest nodes
        assert record["dropped"] == {reason: 1}, (record["round"], record["dropped"])
    hostile = int(node_file.read_text())
    dropped = [r.getMessage() for r in caplog.records if "dropped reply" in r.getMessage()]
    assert len(dropped) == len(CASES) and all(f"from node {hostile}:" in line for line in dropped)
    for line, (_, reason) in zip(dropped, CASES):
        assert reason in line
    # the honest devices' entries are their own ledgers' epsilons; the hostile node has none
    devices = results["privacy"]["record_level"]["devices"]
    assert sorted(devices) == ["0", "1"]
    store = state_dir(
        cfg,
        Context(
            run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(), run_config={}
        ),
    )
    for pid in range(2):
        ledger = PrivacyLedger.from_json(load_state(store, pid, len(CASES) + 1).ledger_json)
        assert devices[str(pid)]["record-epsilon"] == pytest.approx(ledger.epsilon())
        assert ledger.epsilon() > 0.0
    assert results["privacy"]["record_level"]["epsilon"] == max(d["record-epsilon"] for d in devices.values())


def test_two_nodes_claiming_one_client_id_stop_the_start_up(tmp_path):
    """identify_nodes on a real simulation: partition 2's node claims partition 0's id; the
    start-up fails with one error naming both node ids (no node takes another's place)."""
    from flwr.serverapp import Grid, ServerApp

    from feddistill.client.node import device_id
    from feddistill.server.app import identify_nodes, wait_for_nodes

    errors: list[str] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            # generous timeouts: on a loaded 2-core machine a ClientApp actor can take a while to start
            identify_nodes(grid, wait_for_nodes(grid, 3, 300), 300)
        except RuntimeError as exc:
            errors.append(str(exc))

    client = ClientApp()

    @client.query("identify")
    def identify(msg: Message, context: Context) -> Message:
        pid = device_id(context)
        (tmp_path / f"node{pid}").write_text(str(context.node_id))
        meta = ConfigRecord({protocol.PARTITION: 0 if pid == 2 else pid, protocol.DEVICE: 0})
        return Message(RecordDict({protocol.REPLY_META: meta}), reply_to=msg)

    from flwr.simulation import run_simulation

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=3,
        backend_config=BACKEND,
    )
    assert len(errors) == 1 and "both claim client id 0" in errors[0], errors
    claimants = {(tmp_path / f"node{pid}").read_text() for pid in (0, 2)}
    assert "both claim client id 0" in errors[0] and all(node in errors[0] for node in claimants), errors[0]
