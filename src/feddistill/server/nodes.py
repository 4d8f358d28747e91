"""The fleet's nodes at start-up: wait until all are connected, then ask each which client it serves."""

from __future__ import annotations

import time

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from feddistill import protocol


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> list[int]:
    """At start-up the grid may list only some nodes: wait until all are connected."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {expected} nodes connected after {timeout:.0f} s")
        time.sleep(0.5)


def identify_nodes(grid: Grid, nodes: list[int], timeout: float, devices: set[int] | None = None) -> dict[int, int]:
    """Ask every node once, at start-up, which client it serves (a `query.identify` message):
    its partition id (simulation) or device id. Returns Flower node id -> client id. Nodes that
    say they are devices (reading their own data dir) are added to `devices` when given.

    This table is the only source of a reply's sender for the rest of the run: the server
    attributes every reply by its Flower node id (an authenticated SuperNode in deployment),
    never by anything the reply declares. Start-up fails, naming both node ids, when two
    nodes claim the same client id: keeping the first claimant would let whichever node
    answered first take the other's place (its participations, its device ledger entry),
    and running without either would hide a misconfigured or hostile node."""
    messages = [Message(RecordDict(), dst_node_id=n, message_type=protocol.IDENTIFY) for n in nodes]
    mapping: dict[int, int] = {}
    holder: dict[int, int] = {}  # client id -> the node that claimed it
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        client, is_device = identify_reply(reply)
        if node in mapping:
            raise RuntimeError(f"node {node} identified itself twice")
        if client in holder:
            raise RuntimeError(
                f"nodes {holder[client]} and {node} both claim client id {client}: each node must "
                "serve its own partition-id / device-id (node config); fix the node configs and restart"
            )
        mapping[node], holder[client] = client, node
        if devices is not None and is_device:
            devices.add(node)
    missing = set(nodes) - set(mapping)
    if missing:
        raise RuntimeError(f"{len(missing)} nodes did not identify themselves within {timeout:.0f} s")
    return mapping


def identify_reply(reply: Message) -> tuple[int, bool]:
    """(client id, is a device) from an identify reply: a `meta` ConfigRecord holding an int
    partition id >= 0 and optionally a device flag 0/1, nothing else. Raises RuntimeError."""
    node = reply.metadata.src_node_id
    if reply.has_error():
        raise RuntimeError(f"node {node} did not identify itself: {str(reply.error.reason)[:200]}")
    content = reply.content
    meta = content.config_records.get(protocol.REPLY_META)
    fields = {} if meta is None else dict(meta)
    client, device = fields.get(protocol.PARTITION), fields.get(protocol.DEVICE, 0)
    well_formed = (
        set(content) == {protocol.REPLY_META}
        and meta is not None
        and set(fields) <= {protocol.PARTITION, protocol.DEVICE}
        and type(client) is int
        and 0 <= client < 2**63
        and type(device) is int
        and device in (0, 1)
    )
    if not well_formed:
        raise RuntimeError(
            f"node {node} sent a malformed identify reply: expected a '{protocol.REPLY_META}' record "
            f"with an int '{protocol.PARTITION}' >= 0 and optionally '{protocol.DEVICE}' 0/1, got "
            f"{repr({k: content[k] for k in list(content)[:4]})[:200]}"
        )
    return client, bool(device)
