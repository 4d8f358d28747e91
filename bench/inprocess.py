"""The bare loop the simulation overhead is measured against (bench only, never the product).

:class:`InProcessGrid` is a Flower ``Grid`` that delivers each message by calling the
same ``ClientApp`` in the same process, one after the other: the server code
(``run_distillation``), the client code, the data, the models and every torch step
are exactly those of a Flower simulation run; what is missing is the orchestration
(Ray actors, the simulation engine's queues, message serialisation). The ratio of a
Flower-simulation run to a run on this grid is the orchestration overhead.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1):
        self._app = client_app
        self._run = Run.create_empty(run_id)
        # who is sending, as the SuperLink stamps it on a ServerApp process: Message() reads it
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        # node ids as Flower's simulation makes them: distinct, not the partition ids
        self._contexts = {
            1000 + pid: Context(
                run_id=run_id,
                node_id=1000 + pid,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for pid in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self._next_id = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            self._next_id += 1
            # what the SuperLink stamps on a pushed message (Metadata has no public setters)
            msg.metadata.__dict__["_message_id"] = str(self._next_id)
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            reply = self._app(msg, self._contexts[msg.metadata.dst_node_id])
            self._replies[str(self._next_id)] = reply
            ids.append(str(self._next_id))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


class TreeRSS:
    """Peak of the summed resident memory of a process and all its descendants (for this
    process: Ray's raylet, GCS and workers included), sampled from /proc every ``interval`` s."""

    def __init__(self, interval: float = 0.5, root: int | None = None):
        self.interval = interval
        self.root = os.getpid() if root is None else root
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, tree_rss(self.root))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, tree_rss(self.root))
            time.sleep(self.interval)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def tree_rss(root: int) -> int:
    kids, total, stack = _children(), 0, [root]
    page = os.sysconf("SC_PAGE_SIZE")
    while stack:
        pid = stack.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
        stack.extend(kids.get(pid, []))
    return total
