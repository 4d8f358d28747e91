"""What a distillation run writes besides its checkpoint: JSON files, the audit's artefacts,
the students, the reliability diagram, and results.json's "privacy" block."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from feddistill.atomic import atomic_path
from feddistill.atomic import write_json as _write_json
from feddistill.config import RunConfig
from feddistill.privacy.ledger import PrivacyLedger
from feddistill.privacy.plan import NOISE_SOURCES, RunPrivacy, client_noise_source
from feddistill.runfolder import PrivacyReport, RunFolder, save_model


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """``data`` as indented JSON, atomically (``feddistill.atomic.write_json``)."""
    _write_json(path, data)


def save_student(model, path: Path, cfg: RunConfig, release: str | None = None, temperature: float = 1.0) -> None:
    """The deployed global student: a model file (``feddistill.runfolder.save_model``)."""
    extra = {} if release is None else {"release": release}
    save_model(path, cfg.distill.server_student, model.state_dict(), temperature=float(temperature), **extra)


def save_reliability(calibration: dict[str, Any], path: Path, rid: str | None) -> None:
    from feddistill.calibration import plot_reliability

    rel = calibration["reliability_test"]
    t = calibration["temperature"]
    plot_reliability(
        {"before (T = 1)": rel["before"], f"after (T = {t:.2f})": rel["after"]},
        path,
        title=f"release {rid}: reliability on the test split (T fitted on public validation)",
    )


def save_privacy_plan(run: RunFolder, privacy: RunPrivacy) -> None:
    """The run's privacy plan, as derived when it started: what the audit replays answers through."""
    write_json(run.privacy_plan, privacy.to_dict())


def save_audit_setup(folder: RunFolder, cfg: RunConfig) -> None:
    """The run's audit folder, and its one-run canaries when the config has some."""
    from feddistill.data.fleet import fleet_canaries

    folder.audit.mkdir(parents=True, exist_ok=True)
    canaries = fleet_canaries(cfg)
    if canaries is not None:
        with atomic_path(folder.canaries) as tmp:
            np.savez_compressed(tmp, x=canaries.x, y=canaries.y, included=canaries.included, client=canaries.client)


def save_uploads(path: Path, queries: np.ndarray, collected) -> None:
    """The uploads as the server received them (after validation), for the auditor."""
    arrays = {"queries": queries}
    for pid, answers in zip(collected.senders, collected.answers):
        arrays[RunFolder.upload_key(pid)] = answers
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


def save_released_signal(path: Path, queries: np.ndarray, signal: np.ndarray) -> None:
    """A round's released teacher signal (the DP output of the round) on its queries, for the
    privacy officer's deployment audit (``feddistill audit-deployment``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, queries=np.asarray(queries, dtype=np.int64), signal=np.asarray(signal, np.float32))


def save_secagg_sum(path: Path, queries: np.ndarray, collected) -> None:
    """What the server unmasked in a SecAgg+ round: the survivors' (quantized, under distributed DP
    noised) mean on the round's queries and who survived. It holds no single answer; the teacher
    signal the server releases is made from it."""
    with atomic_path(path) as tmp:
        np.savez_compressed(
            tmp, queries=queries, mean=collected.aggregate, survivors=np.asarray(collected.senders, dtype=np.int64)
        )


def privacy_report(
    cfg: RunConfig,
    privacy: RunPrivacy,
    ledger: PrivacyLedger | None,
    devices: dict[int, dict[str, float]],
    unconfirmed: dict[int, list[int]] | None = None,
) -> dict[str, Any]:
    """results.json's "privacy": every epsilon with its unit, mechanism, accountant and delta.

    ``unconfirmed``: client id -> rounds it was sent after its last kept answer (the round loop's
    ``unconfirmed``); its device may have spent privacy in them that its reported epsilon lacks."""
    plan, record = privacy.upload, privacy.record
    client_level = None
    if ledger is not None:
        client_level = {
            **ledger.summary(),
            "epsilon_rdp": ledger.epsilon_rdp(),
            "protects_against": plan.protects_against,
            "sensitivity": plan.sensitivity,
            "noise_std": plan.noise_std,
            "query_size": cfg.distill.query_size,
            "client_sampling": "each round, once per participation (q=1)"
            if plan.mode == "local"
            else f"Poisson, q={plan.sampling_rate}",
            "analysis": "data-independent" if "gnmax" in plan.mode else "worst case",
            "noise_source": client_noise_source(cfg, plan),
        }
        if plan.distributed:  # SecAgg+ distributed noise: no amplification claimed, delta shared with clipping
            client_level.update(
                {
                    "client_sampling": "none claimed (q=1): the server sees who takes part; every "
                    "round charged as if every client answered",
                    "delta_accountant": plan.delta,
                    "delta_clipping_failure": plan.clip_failure,
                    "delta": cfg.privacy.delta,
                }
            )
    record_level = None
    if record is not None:
        worst = max(devices.items(), key=lambda kv: kv[1]["record-epsilon"], default=(None, None))
        record_level = {
            "epsilon": None if worst[1] is None else worst[1]["record-epsilon"],
            "epsilon_is": "the largest epsilon of any device (each device accounts its own)",
            "delta": record.delta,
            "unit": "record",
            "neighbouring": "add/remove",
            "mechanism": record.mechanism,
            "accountant": "pld",
            "target_epsilon": record.target_epsilon,
            "protects_against": "everyone, the server included (noise added on the device during training)",
            "noise_source": NOISE_SOURCES[cfg.privacy.noise_source],
            "sampling_rate": record.sampling_rate,
            "worst_device": worst[0],
            # the client id each reply's Flower node id maps to (identify_nodes), never an id a reply declares
            "devices_keyed_by": "client id of the sending Flower node (partition-id / device-id given at start-up)",
            "devices": {str(pid): m for pid, m in sorted(devices.items())},
            # a device killed after training loses its reply, not its spend: say where the reported
            # epsilons may be short, instead of under-reporting silently
            "unconfirmed_rounds": {str(pid): rounds for pid, rounds in sorted((unconfirmed or {}).items())},
            "unconfirmed_rounds_are": "rounds a device was sent after its last answer the server kept: it may "
            "have trained and charged its own ledger in them (its epsilon may exceed the one reported here)",
        }
    report = PrivacyReport(client_level=client_level, record_level=record_level)
    if cfg.distill.secure_aggregation != "off":
        from feddistill.server.secagg import secagg_report

        report.secure_aggregation = secagg_report(cfg)
    return report.to_dict()
