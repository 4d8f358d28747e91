"""Where a simulated client's round ran: one line per round in ``RUN_DIR/clients/workers.jsonl``.

Flower's simulation engine runs each client's round in one of its Ray actors, on whichever
node of the Ray cluster has the actor. This log is the run's own record of that placement
(``feddistill simulate --ray-address``, ``flwr run`` on a Ray cluster): a user sees which
nodes did the work and a test checks it. It is written next to the simulated clients' states,
in the run's folder (a multi-node cluster shares that folder anyway, or the clients lose their
students between rounds). A device (node config ``data-dir``) writes none: nothing here leaves
a device, and nothing here is part of a reply.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from feddistill.runfolder import RunFolder


def worker_identity() -> dict[str, Any]:
    """This process's host and pid, and its Ray node id inside a Ray worker (None elsewhere)."""
    ray = sys.modules.get("ray")  # already loaded in Flower's Ray actors; never imported here for a device
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    return {"host": socket.gethostname(), "pid": os.getpid(), "ray_node": node}


def log_placement(output_dir: str | os.PathLike[str], rnd: int, client: int) -> None:
    """Append one line for client ``client``'s round ``rnd``: a single O_APPEND write, so the
    lines of concurrent actors never interleave."""
    path = RunFolder(output_dir).workers
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"round": rnd, "client": client, **worker_identity()}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_placements(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The log's lines (none when the run wrote none); a torn last line from a kill is skipped."""
    path: Path = RunFolder(output_dir).workers
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
