"""Flower's in-memory LinkState with each node's pending requests indexed, for large simulated fleets.

Flower 1.41's simulation engine polls every simulated node for its next request every 0.1 s
(``vce_api.add_messages_to_queue``), and ``InMemoryLinkState.get_message_ins(node_id)`` scans
every stored request, whoever it is for. A sweep therefore costs (nodes x stored requests):
at start-up, when the server asks each of the N nodes which client it serves, that is N^2
checks per sweep (measured: 129 s of start-up at 1,000 nodes, about 100x that at 10,000), and
during a round 10,000 nodes x 100 pending requests keep one core busy under the GIL.

:class:`IndexedLinkState` answers the same call from a per-node index of the stored
requests, in the same (insertion) order, after the same validity check, so what each node
receives and when is unchanged; only the scan over other nodes' requests is gone.
:func:`indexed_linkstate` installs it for the duration of one ``run_simulation`` call (Flower
builds its LinkStateFactory inside that function, with no parameter to pass another).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app import Message
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkState, LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
from flwr.supercore.date import now


class IndexedLinkState(InMemoryLinkState):
    """``InMemoryLinkState`` whose ``get_message_ins`` reads only the asking node's requests."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # node id -> ids of the requests stored for it (a dict as an ordered set: insertion order)
        self._pending: dict[int, dict[str, None]] = {}

    def store_message_ins(self, message: Message) -> str | None:
        message_id = super().store_message_ins(message)
        if message_id is not None:
            with self.lock:
                self._pending.setdefault(message.metadata.dst_node_id, {})[message_id] = None
        return message_id

    def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list[Message]:
        """Flower's ``get_message_ins``, over this node's requests only (deleted ones are dropped
        from the index here, lazily)."""
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        if node_id not in self._pending:  # most nodes, most of the time: no lock, no clock
            return []
        found: list[Message] = []
        with self.lock:
            pending = self._pending.get(node_id, {})
            for msg_id in list(pending):
                self._check_stored_messages({msg_id})  # may delete it (expired), as Flower's scan does
                msg = self.message_ins_store.get(msg_id)
                if msg is None:
                    del pending[msg_id]
                elif (run_id is None or msg.metadata.run_id == run_id) and msg.metadata.delivered_at == "":
                    found.append(msg)
                if limit and len(found) == limit:
                    break
            if not pending:
                self._pending.pop(node_id, None)
        if found:
            delivered_at = now().isoformat()
            for msg in found:
                msg.metadata.delivered_at = delivered_at
        return found


class IndexedLinkStateFactory(LinkStateFactory):
    """A LinkStateFactory whose in-memory state is an :class:`IndexedLinkState`."""

    def state(self) -> LinkState:
        if self.database != FLWR_IN_MEMORY_DB_NAME:
            return super().state()
        with self._state_lock:
            if self.state_instance is None:
                self.state_instance = IndexedLinkState(self.federation_manager, self.objectstore_factory.store())
        return self.state_instance


@contextmanager
def indexed_linkstate() -> Iterator[None]:
    """Within the block, Flower's ``run_simulation`` keeps its messages in an :class:`IndexedLinkState`."""
    module = importlib.import_module("flwr.simulation.run_simulation")  # the module, not its function

    if getattr(module, "LinkStateFactory", None) is not LinkStateFactory:
        raise RuntimeError(
            "flwr.simulation.run_simulation no longer builds its state with LinkStateFactory: "
            "feddistill.simulations.linkstate does not fit this Flower version"
        )
    module.LinkStateFactory = IndexedLinkStateFactory  # type: ignore[misc]
    try:
        yield
    finally:
        module.LinkStateFactory = LinkStateFactory  # type: ignore[misc]
