"""A run's folder holds one run: a new run never writes into an earlier run's folder.

Simulated clients keep their students and privacy ledgers under the run's folder, the
server its checkpoint, journal and releases. A second run started in the same folder would
pick those up (a client's ledger from the first run, its student, old audit artefacts next
to new results). So a run refuses a folder that already holds a run unless it resumes that
run (``--resume``) or the user asks to replace it (``--overwrite``), which deletes what the
earlier run wrote, and only that.

:func:`prepare_run_folder` is the one check: the CLI calls it before the simulation starts
(so a bad ``--out`` fails in one line before anything runs) and the ServerApp at the start
of every run (``flwr run .`` reads ``output-dir`` from the run config).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["RUN_ENTRIES", "RUN_MARKERS", "RunFolderError", "check_output_folder", "clear_run_folder",
           "prepare_run_folder", "run_markers"]

# Any of these in a folder means a run has started there (config.json is the first thing a
# run writes; clients/ holds simulated clients' students and ledgers).
RUN_MARKERS = ("results.json", "checkpoint.pt", "config.json", "clients")

# Everything a run writes in its folder, and what the commands that read a run back write
# there by default (audit, export, report): the only names --overwrite deletes.
RUN_ENTRIES = frozenset({
    "config.json", "results.json", "checkpoint.pt", "ledger-journal.jsonl", "global_student.pt",
    "accuracy.png", "reliability.png", "releases", "clients", "audit",  # the run itself
    "fedavg", "dp-fedavg",  # its baselines (Flower's FedAvg / DP-FedAvg on the same fleet)
    "audit-report", "exports", "report.html",  # feddistill audit / export / report
})
# atomic_path's temp files (".<stem>.<12 hex>.tmp<suffix>") and this module's write probes,
# left behind by a killed run
_TEMP_FILE = re.compile(r"^(\..+\.[0-9a-f]{12}\.tmp(\.[\w-]+)?|\.feddistill-probe-\w+)$")

CLI_WAYS_OUT = "continue it with `feddistill simulate --resume {path}`, or replace it with --overwrite"


class RunFolderError(ValueError):
    """A run folder cannot be used as asked; the message is one line naming the folder."""


def run_markers(path: str | os.PathLike[str]) -> list[str]:
    """The :data:`RUN_MARKERS` present in ``path`` (empty when it holds no run)."""
    path = Path(path)
    return [name for name in RUN_MARKERS if os.path.lexists(path / name)] if path.is_dir() else []


def prepare_run_folder(path: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False,
                       ways_out: str = CLI_WAYS_OUT) -> Path:
    """Make ``path`` ready for a run and return it, or raise :class:`RunFolderError`.

    - a new run (neither flag): the folder must not hold a run (:data:`RUN_MARKERS`);
    - ``overwrite``: an earlier run's files are deleted first (:func:`clear_run_folder`);
    - ``resume``: the folder must exist (the caller checks it holds a resumable run).

    In every case the folder must be a writable directory (created when missing).
    ``ways_out`` tells the user how to go on when the folder holds a run (``{path}`` is filled in).
    """
    path = Path(path)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: resume a run, or replace it")
    _check_place(path)
    if resume:
        if not path.is_dir():
            raise RunFolderError(f"{path}: no such run folder to resume")
    else:
        found = run_markers(path)
        if found and not overwrite:
            raise RunFolderError(f"{path}: holds an earlier run ({', '.join(found)}); "
                                 + ways_out.format(path=path))
        if found:
            clear_run_folder(path)
    return check_output_folder(path)


def check_output_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` as a writable directory (created when missing), or :class:`RunFolderError`
    saying why not: it is a file, lies under a file, or cannot be written."""
    path = Path(path)
    _check_place(path)
    _check_writable(path)
    return path


def clear_run_folder(path: str | os.PathLike[str]) -> list[str]:
    """Delete what a run wrote in ``path`` (the names in :data:`RUN_ENTRIES` and leftover temp
    files); returns the names deleted. Refuses, deleting nothing, a folder that does not look
    like a feddistill run or that holds anything else (the user's own files stay theirs)."""
    path = Path(path)
    if not run_markers(path):
        raise RunFolderError(f"{path}: not cleared: it holds no feddistill run ({', '.join(RUN_MARKERS)})")
    for name in ("config.json", "results.json"):
        if (path / name).is_file() and not _is_run_json(path / name):
            raise RunFolderError(f"{path}: not cleared: {name} was not written by a feddistill run")
    entries = sorted(path.iterdir())
    strangers = [e.name for e in entries if e.name not in RUN_ENTRIES and not _TEMP_FILE.match(e.name)]
    if strangers:
        shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
        raise RunFolderError(f"{path}: not cleared: it also holds {shown}, which no feddistill run writes; "
                             "move those away or choose another folder")
    for entry in entries:
        try:
            if entry.is_dir() and not entry.is_symlink():  # a link is removed, never followed
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            raise RunFolderError(f"{entry}: cannot delete it ({exc.strerror or exc})") from None
    return [e.name for e in entries]


def _is_run_json(path: Path) -> bool:
    """config.json and results.json of a run are JSON objects naming the run's method."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "method" in data


def _check_place(path: Path) -> None:
    """The folder is, or can become, a directory: neither it nor a parent is a file."""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{path}: is a file, not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunFolderError(f"{path}: cannot be a folder: {parent} is a file")
            return


def _check_writable(path: Path) -> None:
    """Create the folder and a probe file in it: the only test that also holds for root,
    read-only mounts and ACLs."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".feddistill-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunFolderError(f"{path}: cannot write there ({exc.strerror or type(exc).__name__})") from None
