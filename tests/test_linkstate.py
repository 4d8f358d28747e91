"""The indexed LinkState of large simulations (feddistill.simulations.linkstate) against Flower's own."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager

from feddistill.simulations.linkstate import IndexedLinkState, IndexedLinkStateFactory, indexed_linkstate

RUN_ID = 7


def _state(factory_type: type[LinkStateFactory], nodes: int):
    """A LinkState as Flower's simulation prepares it: one run, `nodes` registered nodes."""
    factory = factory_type(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    run = Run.create_empty(run_id=RUN_ID)
    run.federation_id, run.primary_task_id = NOOP_FEDERATION_ID, 1
    state = factory.state()
    state.run_ids[RUN_ID] = RunRecord(run=run)  # type: ignore[attr-defined]
    state.task_store[1] = Task(task_id=1, run_id=RUN_ID)  # type: ignore[attr-defined]
    partition_to_node = {p: n for n, p in _register_nodes(nodes, factory).items()}
    return state, partition_to_node


def _store(state, node: int, message_id: str) -> None:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
    msg = Message(RecordDict(), dst_node_id=node, message_type="query.identify")
    msg.metadata.__dict__["_message_id"] = message_id
    assert state.store_message_ins(msg) == message_id


def _poll_all(state, partition_to_node: dict[int, int]) -> list[tuple[int, str]]:
    """What Flower's simulation engine does: ask every node for one request, sweep after sweep."""
    delivered = []
    for _ in range(4):
        for p, node in partition_to_node.items():
            delivered += [(p, m.metadata.message_id) for m in state.get_message_ins(node_id=node, limit=1)]
    return delivered


def test_indexed_state_delivers_what_flowers_state_delivers():
    flower, flower_nodes = _state(LinkStateFactory, 30)
    indexed, indexed_nodes = _state(IndexedLinkStateFactory, 30)
    assert isinstance(indexed, IndexedLinkState) and not isinstance(flower, IndexedLinkState)
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 30, size=60)  # some nodes get several requests, some none
    for i, p in enumerate(targets):
        _store(flower, flower_nodes[int(p)], f"m{i}")
        _store(indexed, indexed_nodes[int(p)], f"m{i}")
    gone = {f"m{i}" for i in range(0, 60, 7)}  # deleted before delivery (as a pulled reply deletes them)
    flower.delete_messages(gone)
    indexed.delete_messages(gone)

    expected = _poll_all(flower, flower_nodes)
    assert _poll_all(indexed, indexed_nodes) == expected
    assert len(expected) == 60 - len(gone)  # every live request delivered exactly once, none of the deleted
    assert not gone & {m for _, m in expected}


class _CountingState(IndexedLinkState):
    checked = 0

    def _check_stored_messages(self, message_ids, run_id=None):
        type(self).checked += len(message_ids)
        return super()._check_stored_messages(message_ids, run_id)


class _CountingFactory(IndexedLinkStateFactory):
    def state(self):
        if self.state_instance is None:
            self.state_instance = _CountingState(self.federation_manager, self.objectstore_factory.store())
        return self.state_instance


def test_a_node_poll_looks_only_at_that_nodes_requests():
    state, nodes = _state(_CountingFactory, 200)
    for p in range(1, 200):  # a request for every node but partition 0
        _store(state, nodes[p], f"m{p}")
    _CountingState.checked = 0
    assert state.get_message_ins(node_id=nodes[0], limit=1) == []
    assert _CountingState.checked == 0  # Flower's own state checks all 199 stored requests here
    assert [m.metadata.message_id for m in state.get_message_ins(node_id=nodes[5], limit=1)] == ["m5"]
    assert _CountingState.checked == 1


def test_indexed_linkstate_is_installed_only_within_the_block():
    module = importlib.import_module("flwr.simulation.run_simulation")
    with pytest.raises(KeyError):
        with indexed_linkstate():
            assert module.LinkStateFactory is IndexedLinkStateFactory
            raise KeyError("leave the block by an exception")
    assert module.LinkStateFactory is LinkStateFactory
