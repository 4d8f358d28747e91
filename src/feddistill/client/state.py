"""What a client keeps between rounds: its student and its record-level privacy ledger.

Kept on disk, not only in Flower's in-memory node state, so that it survives a crash of
the process that holds it: a device keeps it in its own data dir (node config
``data-dir``), a simulated client under the run's output dir. Two versions are kept
(current and previous) so that a round re-run after a server crash starts from the
student as it was before that round. The ledger is always taken from the NEWEST
version (the last one written, by a write counter ``seq``: round numbers restart with
every run a device serves): privacy spent in an interrupted round, or in an earlier run,
is never forgotten.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context

from feddistill.config import RunConfig


@dataclass
class ClientState:
    student: dict[str, Any] | None  # state_dict, or None for a fresh student
    ledger_json: str | None


def state_dir(cfg: RunConfig, context: Context) -> Path:
    data_dir = context.node_config.get("data-dir")
    if data_dir:
        return Path(str(data_dir)) / "state"
    return Path(cfg.output_dir) / "clients"


def _paths(directory: Path, partition_id: int) -> tuple[Path, Path]:
    current = directory / f"client{partition_id}.pt"
    return current, current.with_suffix(".prev.pt")


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=False)
    except Exception as exc:
        raise RuntimeError(f"{path}: unreadable client state ({exc}); move it away to start this client afresh") from exc


def _written_order(version: dict[str, Any]) -> tuple[int, int]:
    return int(version.get("seq", -1)), int(version["round"])  # files from before `seq`: by round


def load_state(directory: Path, partition_id: int, round_: int) -> ClientState:
    """The student as of the newest round before `round_`, and the last-written ledger."""
    versions = [v for v in map(_read, _paths(directory, partition_id)) if v is not None]
    if not versions:
        return ClientState(None, None)
    newest = max(versions, key=_written_order)
    before = [v for v in versions if v["round"] < round_]
    student = max(before, key=lambda v: v["round"])["student"] if before else None
    return ClientState(student, newest.get("ledger"))


def save_state(directory: Path, partition_id: int, round_: int, student: dict[str, Any], ledger_json: str | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    current, previous = _paths(directory, partition_id)
    last = _read(current)
    seq = int(last.get("seq", 0)) + 1 if last is not None else 0
    tmp = current.with_suffix(f".tmp{os.getpid()}")
    torch.save({"round": round_, "seq": seq, "student": student, "ledger": ledger_json}, tmp)
    if current.is_file():
        os.replace(current, previous)
    os.replace(tmp, current)
