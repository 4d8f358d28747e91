"""Signed downloads: a client that pins the server's key refuses unsigned, tampered and replayed ones."""

from __future__ import annotations

import pytest
from flwr.app import Array, Context, RecordDict

from feddistill import protocol
from feddistill.client.distill import handle_distill
from feddistill.config import load_config
from feddistill.data.fleet import load_fleet
from feddistill.deploy.certs import generate_credentials
from feddistill.deploy.download_signing import sign_download
from test_simulation import SMALL, _request


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture()
def setup(tmp_path):
    generate_credentials(tmp_path / "certs", num_supernodes=1)
    cfg = load_config(
        None,
        {
            **SMALL,
            "output_dir": str(tmp_path / "run"),
            "distill.digest_epochs": 0,
            "distill.revisit_epochs": 0,
            "security.release_public_key": str(tmp_path / "certs" / "release-signing.pub"),
        },
    )
    digest = load_fleet(cfg.data, cfg.fleet, cfg.seed).splits.reference_digest
    key = str(tmp_path / "certs" / "release-signing.key")
    context = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 5}, state=RecordDict(), run_config={}
    )
    return cfg, digest, key, context


def _signed(cfg, digest, key, rnd):
    msg = _request(cfg, digest, rnd=rnd)
    config = msg.content.config_records[protocol.CONFIG_RECORD]
    sign_download(config, msg.content.array_records[protocol.TEACHER_RECORD], key_path=key, rnd=rnd, run_id=1)
    return msg


def _refusal(reply) -> str:
    assert reply.has_error() and reply.error.code == protocol.REFUSED
    return reply.error.reason


def test_signed_download_is_accepted(setup):
    cfg, digest, key, context = setup
    assert not handle_distill(_signed(cfg, digest, key, 1), context, cfg).has_error()


def test_unsigned_download_is_refused(setup):
    cfg, digest, _, context = setup
    assert "unsigned" in _refusal(handle_distill(_request(cfg, digest, rnd=1), context, cfg))


def test_tampered_teacher_signal_is_refused(setup):
    cfg, digest, key, context = setup
    msg = _signed(cfg, digest, key, 1)
    teacher = msg.content.array_records[protocol.TEACHER_RECORD]
    forged = teacher[protocol.SIGNAL].numpy().copy()
    forged[:, 0] = 1.0  # push every query toward class 0
    teacher[protocol.SIGNAL] = Array(forged)
    assert "tampered" in _refusal(handle_distill(msg, context, cfg))


def test_a_replayed_older_round_is_refused(setup):
    cfg, digest, key, context = setup
    old = _signed(cfg, digest, key, 2)
    assert not handle_distill(_signed(cfg, digest, key, 3), context, cfg).has_error()
    assert "replayed" in _refusal(handle_distill(old, context, cfg))
