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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context

from feddistill.config import RunConfig
from feddistill.runfolder import ModelFileError, RunFolder, SavedModel, client_state_paths, load_model, save_model

# A state file is a model file (feddistill.runfolder.save_model) whose metadata is the round it
# was written after, its write counter ``seq`` and the device's record-level ledger: the JSON of
# PrivacyLedger.to_json (format "feddistill.privacy_ledger", with its own version), or None.


@dataclass
class ClientState:
    student: dict[str, Any] | None  # state_dict, or None for a fresh student
    ledger_json: str | None


def state_dir(cfg: RunConfig, context: Context) -> Path:
    data_dir = context.node_config.get("data-dir")
    if data_dir:
        return Path(str(data_dir)) / "state"
    return RunFolder(cfg.output_dir).clients


def _legacy(blob: dict[str, Any]) -> dict[str, Any]:
    """A state file from before model files: ``{"round", "seq"?, "student", "ledger"}``."""
    if "student" not in blob or "state_dict" in blob:
        return blob
    return {"model": None, "state_dict": blob["student"], **{k: v for k, v in blob.items() if k != "student"}}


def _read(path: Path) -> SavedModel | None:
    if not path.is_file():
        return None
    try:
        return load_model(path, what="client state", legacy=_legacy)
    except ModelFileError as exc:
        if exc.unknown_version:  # never "move it away": that would forget the privacy it has spent
            raise RuntimeError(str(exc)) from exc
        raise RuntimeError(f"{exc}; unreadable client state: move it away to start this client afresh") from exc


def _written_order(version: SavedModel) -> tuple[int, int]:
    meta = version.metadata
    return int(meta.get("seq", -1)), int(meta["round"])  # files from before `seq`: by round


def load_state(directory: Path, partition_id: int, round_: int) -> ClientState:
    """The student as of the newest round before `round_`, and the last-written ledger."""
    versions = [v for v in map(_read, client_state_paths(directory, partition_id)) if v is not None]
    if not versions:
        return ClientState(None, None)
    newest = max(versions, key=_written_order)
    before = [v for v in versions if v.metadata["round"] < round_]
    student = max(before, key=lambda v: v.metadata["round"]).state_dict if before else None
    return ClientState(student, newest.metadata.get("ledger"))


def save_state(
    directory: Path, partition_id: int, round_: int, student: dict[str, Any], ledger_json: str | None
) -> None:
    """Write the client's state after round `round_`, keeping the version before it."""
    current, previous = client_state_paths(directory, partition_id)
    last = _read(current)
    seq = int(last.metadata.get("seq", 0)) + 1 if last is not None else 0
    save_model(current, None, student, previous=previous, round=round_, seq=seq, ledger=ledger_json)
