"""The server's checkpoint: everything a killed server needs to resume, written atomically
(temp file + rename) at the end of every round.

Rule for the privacy ledger (the conservative one that is also exact):
- central / GNMax modes: a round's privacy is spent when its noisy aggregate is released,
  and it is released only at the end of the round, together with this checkpoint. A round
  interrupted before its checkpoint released nothing; it is not counted and is re-run.
- local mode: answers leave the devices already noised, so privacy is spent as they are
  sent. Every round is journaled (``ledger-journal.jsonl``) BEFORE its messages go out;
  on resume, journaled rounds newer than the checkpoint are charged, and the re-run is
  charged again.
- record level: each device's own ledger records a spend when it trains, and keeps it
  across a re-run (``feddistill.client.state``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddistill.atomic import atomic_path
from feddistill.runfolder import CHECKPOINT, JOURNAL, RunFolder

__all__ = [
    "CHECKPOINT",
    "JOURNAL",
    "CheckpointError",
    "ServerState",
    "journal_round",
    "journaled_rounds_after",
    "load_checkpoint",
    "save_checkpoint",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or belongs to another config."""


@dataclass
class ServerState:
    round: int  # last completed round
    signal: np.ndarray
    student: dict[str, Any]
    rng: dict[str, Any]  # bit-generator states by name
    ledger_json: str | None
    participations: dict[int, int]
    devices: dict[int, dict[str, float]]
    rounds: list[dict[str, Any]]
    public_only: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(out: Path, config_digest: str, state: ServerState) -> None:
    with atomic_path(RunFolder(out).checkpoint) as tmp:
        torch.save({"version": 1, "config_digest": config_digest, "state": state.__dict__}, tmp)


def load_checkpoint(out: Path, config_digest: str) -> ServerState:
    path = RunFolder(out).checkpoint
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from (a run writes one after every round)")
    try:
        blob = torch.load(path, weights_only=False)
        state = ServerState(**blob["state"])
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from exc
    if blob.get("config_digest") != config_digest:
        raise CheckpointError(
            f"{path}: written by a different config (config hash mismatch); resume with the same config"
        )
    return state


def journal_round(out: Path, rnd: int) -> None:
    """Record, durably and before anything is sent, that round `rnd` is about to spend privacy."""
    with open(RunFolder(out).journal, "a") as fh:
        fh.write(json.dumps({"round": rnd}) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def journaled_rounds_after(out: Path, rnd: int) -> list[int]:
    path = RunFolder(out).journal
    if not path.is_file():
        return []
    rounds = []
    for line in path.read_text().splitlines():
        try:
            rounds.append(int(json.loads(line)["round"]))
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a kill mid-write
    return sorted(r for r in rounds if r > rnd)
