"""Reading and validating what a finished run left for the auditor.

A run made with ``audit.keep-artifacts = true`` writes (see ``feddistill.server.app``
and ``feddistill.client.distill``; the layout and file formats are ``feddistill.runfolder``'s)::

    RUN_DIR/results.json                      config, reference digest, rounds, privacy claims
    RUN_DIR/global_student.pt                 the released global student   -> target (c)
    RUN_DIR/audit/uploads/roundNNNN.npz       queries + every client's answers -> target (a)
    RUN_DIR/audit/clients/client{pid}.pt      each client's final local student -> target (b)
    RUN_DIR/audit/canaries.npz                one-run canaries (when audit.canaries > 0)

:func:`load_run` checks every one of them up front and raises :class:`AuditInputError`
(the CLI's exit code 2) with a message that names the missing or unreadable file and
says how to get it, before any model is trained.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddistill.config import ConfigError, RunConfig, parse_config
from feddistill.data import DataError
from feddistill.data.fleet import Canaries, Fleet, load_fleet
from feddistill.model_names import MODEL_NAMES
from feddistill.models import build_model
from feddistill.privacy.plan import RunPrivacy, UploadPrivacy
from feddistill.runfolder import (
    CLIENT_FILE,
    UPLOAD_FILE,
    UPLOAD_KEY,
    ModelFileError,
    PrivacyClaim,
    PrivacyReport,
    ResultsFormatError,
    RunFolder,
    load_model,
)

__all__ = ["AuditInputError", "ClientUploads", "RunArtifacts", "load_run", "KEEP_HINT"]

KEEP_HINT = "re-run the simulation with --set audit.keep-artifacts=true"
_ROUND_FILE = UPLOAD_FILE
_CLIENT_KEY = UPLOAD_KEY
_CLIENT_FILE = CLIENT_FILE


class AuditInputError(Exception):
    """The run directory or the policy cannot be audited (CLI exit code 2).

    The message names the missing/corrupt file (or key) and how to fix it.
    """


@dataclass(frozen=True, eq=False)
class ClientUploads:
    """Everything one client uploaded, in round order, as the server received it."""

    rounds: list[int]
    queries: list[np.ndarray]  # per round, (Q,) int64 indices into the reference set
    answers: list[np.ndarray]  # per round, (Q, C) float32 (possibly DP-noised)

    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.queries), np.concatenate(self.answers).astype(np.float32)


@dataclass(frozen=True, eq=False)
class RunArtifacts:
    run_dir: Path
    cfg: RunConfig
    results: dict[str, Any]
    fleet: Fleet
    privacy: dict[str, dict[str, Any] | None]  # {"record_level": ..., "client_level": ...}
    upload: UploadPrivacy  # how the run bounded and noised answers (its privacy plan)
    global_student: tuple[str, dict[str, torch.Tensor]]  # (arch, state_dict)
    uploads: dict[int, ClientUploads]  # partition id -> uploads
    client_students: dict[int, tuple[str, dict[str, torch.Tensor]]]
    canaries: Canaries | None
    warnings: list[str] = field(default_factory=list)

    @property
    def participants(self) -> list[int]:
        """Clients that uploaded at least once (their private data is in the global student)."""
        return sorted(self.uploads)

    @property
    def is_dp(self) -> bool:
        return any(v is not None for v in self.privacy.values())


def _load_model_file(path: Path, what: str, image_size: int, num_classes: int) -> tuple[str, dict[str, torch.Tensor]]:
    try:
        saved = load_model(path, what=what)
    except ModelFileError as exc:
        raise AuditInputError(f"{exc}; {KEEP_HINT}" if not exc.unknown_version else str(exc)) from exc
    arch = saved.model
    if arch not in MODEL_NAMES:
        raise AuditInputError(f"{path}: unknown model {arch!r} (known: {', '.join(MODEL_NAMES)})")
    try:
        build_model(arch, image_size, num_classes).load_state_dict(saved.state_dict)
    except Exception as exc:
        raise AuditInputError(
            f"{path}: {what} does not fit a {arch!r} for {image_size}x{image_size} images, "
            f"{num_classes} classes ({exc})"
        ) from exc
    return arch, saved.state_dict


def _privacy_claims(results: dict[str, Any], path: Path, warnings: list[str]) -> dict[str, dict[str, Any] | None]:
    """The run's claims, ``None`` per unit it does not claim.  A claim whose epsilon is
    null (e.g. record-level DP on, but no device trained) claims nothing."""
    privacy = results.get("privacy")
    if privacy is None:
        return {"record_level": None, "client_level": None}
    try:
        report = PrivacyReport.from_dict(privacy, "privacy")
    except ResultsFormatError as exc:
        raise AuditInputError(f"{path}: {exc}") from exc
    out: dict[str, dict[str, Any] | None] = {}
    for unit, claim in report.claims().items():
        out[unit] = _checked_claim(claim, unit, path, warnings)
    return out


def _checked_claim(claim: PrivacyClaim | None, unit: str, path: Path, warnings: list[str]) -> dict[str, Any] | None:
    """A claim as the audit uses it (its results.json object), or None when it claims nothing."""
    if claim is None:
        return None
    if "epsilon" in claim and claim.epsilon is None:
        warnings.append(f"privacy.{unit} has no epsilon (nothing was accounted): treated as no claim")
        return None
    for key in ("epsilon", "delta"):
        v = claim.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise AuditInputError(f"{path}: 'privacy.{unit}.{key}' must be a finite number >= 0, got {v!r}")
    if not claim.delta < 1:
        raise AuditInputError(f"{path}: 'privacy.{unit}.delta' must be < 1")
    return claim.to_dict()


def _load_uploads(upload_dir: Path, ref_size: int, num_classes: int, warnings: list[str]) -> dict[int, ClientUploads]:
    if not upload_dir.is_dir():
        raise AuditInputError(f"{upload_dir}: missing (the clients' uploads, target (a)); {KEEP_HINT}")
    files = sorted((int(m.group(1)), p) for p in upload_dir.iterdir() if (m := _ROUND_FILE.match(p.name)))
    if not files:
        raise AuditInputError(f"{upload_dir}: no roundNNNN.npz files (the clients' uploads); {KEEP_HINT}")
    per_client: dict[int, tuple[list[int], list[np.ndarray], list[np.ndarray]]] = {}
    for rnd, path in files:
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise AuditInputError(f"{path}: cannot read uploads ({type(exc).__name__}: {exc}); {KEEP_HINT}") from exc
        if "queries" not in arrays:
            raise AuditInputError(f"{path}: no 'queries' array; {KEEP_HINT}")
        queries = np.asarray(arrays.pop("queries")).astype(np.int64).ravel()
        if queries.size and (queries.min() < 0 or queries.max() >= ref_size):
            raise AuditInputError(f"{path}: queries outside the reference set (size {ref_size})")
        for key, answers in arrays.items():
            m = _CLIENT_KEY.match(key)
            if m is None:
                raise AuditInputError(f"{path}: unexpected array {key!r} (expected 'queries' and 'client<pid>')")
            pid = int(m.group(1))
            if pid < 0:
                warnings.append(f"{path.name}: answers from an unknown sender ({key}) ignored")
                continue
            if answers.shape != (queries.size, num_classes):
                raise AuditInputError(
                    f"{path}: {key} has shape {answers.shape}, expected ({queries.size}, {num_classes})"
                )
            entry = per_client.setdefault(pid, ([], [], []))
            entry[0].append(rnd)
            entry[1].append(queries)
            entry[2].append(np.asarray(answers, dtype=np.float32))
    if not per_client:
        raise AuditInputError(f"{upload_dir}: no client answered in any round; nothing to audit")
    return {pid: ClientUploads(*v) for pid, v in sorted(per_client.items())}


def _load_canaries(path: Path, cfg: RunConfig, image_size: int, num_classes: int) -> Canaries | None:
    if not path.is_file():
        if cfg.audit.canaries > 0:
            raise AuditInputError(
                f"{path}: missing although the run's config has audit.canaries = {cfg.audit.canaries}; {KEEP_HINT}"
            )
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise AuditInputError(f"{path}: cannot read canaries ({type(exc).__name__}: {exc})") from exc
    missing = {"x", "y", "included", "client"} - set(arrays)
    if missing:
        raise AuditInputError(f"{path}: missing arrays {sorted(missing)}")
    x = np.asarray(arrays["x"], dtype=np.float32)
    y = np.asarray(arrays["y"]).astype(np.int64).ravel()
    inc = np.asarray(arrays["included"]).astype(bool).ravel()
    m = y.size
    if x.shape != (m, 1, image_size, image_size) or inc.shape != (m,) or m == 0:
        raise AuditInputError(f"{path}: inconsistent shapes x {x.shape}, y {y.shape}, included {inc.shape}")
    if y.min() < 0 or y.max() >= num_classes:
        raise AuditInputError(f"{path}: canary labels outside 0..{num_classes - 1}")
    return Canaries(x=x, y=y, included=inc, client=int(np.asarray(arrays["client"]).ravel()[0]))


def _load_results(run_dir: Path) -> tuple[dict[str, Any], RunConfig]:
    """results.json of a feddistill run, and its parsed config."""
    if not run_dir.is_dir():
        raise AuditInputError(f"{run_dir}: not a directory (expected a finished run's output directory)")
    results_path = RunFolder(run_dir).results
    if not results_path.is_file():
        raise AuditInputError(f"{results_path}: missing; is {run_dir} a finished run's output directory?")
    try:
        results = json.loads(results_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditInputError(f"{results_path}: not readable JSON ({exc}); re-run the simulation") from exc
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
        raise AuditInputError(f"{results_path}: no 'config' object (was it written by feddistill?)")
    if results.get("method", "feddistill") != "feddistill":
        raise AuditInputError(
            f"{results_path}: method {results.get('method')!r}; the audit targets federated-distillation runs"
        )
    try:
        return results, parse_config(results["config"], str(results_path))
    except ConfigError as exc:
        raise AuditInputError(str(exc)) from exc


def _rebuild_fleet(cfg: RunConfig, results: dict[str, Any], results_path: Path) -> Fleet:
    """The run's data rebuilt from its config: who was a member, checked against the recorded digest."""
    try:
        fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    except (DataError, OSError) as exc:
        raise AuditInputError(f"cannot rebuild the run's data to know who was a member: {exc}") from exc
    digest = results.get("reference_digest")
    if digest is not None and digest != fleet.splits.reference_digest:
        raise AuditInputError(
            f"{results_path}: reference_digest differs from the data rebuilt from its config "
            "(the data set changed since the run); membership ground truth would be wrong"
        )
    return fleet


def _load_client_students(
    run: RunFolder, uploads: dict[int, ClientUploads], num_clients: int, size: int, classes: int, warnings: list[str]
) -> dict[int, tuple[str, dict[str, torch.Tensor]]]:
    """Every uploader's final local student (required), then any other client's that was kept."""
    clients_dir = run.local_students
    if not clients_dir.is_dir():
        raise AuditInputError(f"{clients_dir}: missing (the clients' local students, target (b)); {KEEP_HINT}")
    client_students: dict[int, tuple[str, dict[str, torch.Tensor]]] = {}
    for pid in uploads:
        path = run.local_student(pid)
        if not path.is_file():
            raise AuditInputError(
                f"{path}: missing: client {pid} uploaded answers but its local student was not kept; {KEEP_HINT}"
            )
        client_students[pid] = _load_model_file(path, f"client {pid}'s local student", size, classes)
    for path in sorted(clients_dir.iterdir()):
        m = _CLIENT_FILE.match(path.name)
        if m and int(m.group(1)) not in client_students and int(m.group(1)) < num_clients:
            pid = int(m.group(1))
            client_students[pid] = _load_model_file(path, f"client {pid}'s local student", size, classes)
            warnings.append(f"client {pid} has a local student but no accepted upload")
    return client_students


def _load_privacy_plan(path: Path) -> RunPrivacy:
    """The privacy plan the run used (written when it started), so that reference models' answers
    are replayed through the same mechanism."""
    if not path.is_file():
        raise AuditInputError(f"{path}: missing (the privacy plan a run writes when it starts); re-run the simulation")
    try:
        return RunPrivacy.from_json(path.read_text())
    except (ValueError, TypeError, KeyError) as exc:
        raise AuditInputError(f"{path}: unreadable privacy plan ({exc!r})") from exc


def load_run(run_dir: str | Path) -> RunArtifacts:
    """Read and validate a run directory; raise :class:`AuditInputError` naming what is missing."""
    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    results, cfg = _load_results(run_dir)
    fleet = _rebuild_fleet(cfg, results, run.results)
    warnings: list[str] = []
    privacy = _privacy_claims(results, run.results, warnings)
    upload = _load_privacy_plan(run.privacy_plan).upload

    size, classes = fleet.image_size, fleet.num_classes
    student_path = run.global_student
    if not student_path.is_file():
        raise AuditInputError(
            f"{student_path}: missing (the released global student, target (c)); re-run the simulation"
        )
    global_student = _load_model_file(student_path, "the global student", size, classes)

    audit_dir = run.audit
    if not audit_dir.is_dir():
        raise AuditInputError(
            f"{audit_dir}: missing: the run kept no audit artefacts (uploads, local students, canaries); {KEEP_HINT}"
        )
    uploads = _load_uploads(run.uploads, len(fleet.splits.reference), classes, warnings)
    for pid in uploads:
        if pid >= cfg.fleet.num_clients:
            raise AuditInputError(f"{run.uploads}: {run.upload_key(pid)} is not in a fleet of {cfg.fleet.num_clients}")
    client_students = _load_client_students(run, uploads, cfg.fleet.num_clients, size, classes, warnings)

    canaries = _load_canaries(run.canaries, cfg, size, classes)
    if canaries is not None and canaries.client not in client_students:
        # no accepted upload and no local student (both checked above): the client never trained
        # in this run, so its canaries never left it and there is nothing to audit
        warnings.append(
            f"canary audit not run: canary client {canaries.client} took no part in the run "
            f"(no upload, no {run.local_student(canaries.client)})"
        )
        canaries = None
    return RunArtifacts(
        run_dir=run_dir,
        cfg=cfg,
        results=results,
        fleet=fleet,
        privacy=privacy,
        upload=upload,
        global_student=global_student,
        uploads=uploads,
        client_students=client_students,
        canaries=canaries,
        warnings=warnings,
    )
