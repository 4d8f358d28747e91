"""Canary records on a device, for the officer's one-run record-level audit.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023: ``m``
canary records, each added to the training data by an independent fair coin; after the run,
the auditor guesses which were in from the released model, and the number of right guesses
bounds epsilon from below.

A device started with the node config ``canary-records=M`` (set by the privacy officer) makes
``M`` canaries once, in its own data dir (:data:`CANARY_FILE`): uniform-noise images of its
image size with random labels (they are no one's data, and as memorable as a record can be),
and a coin per canary from OS entropy. The included ones join its private training set in
every round; nothing about them leaves the device in a reply (the reply schema is unchanged).
After the run, ``feddistill device-canaries DATA_DIR --out FILE`` exports the canaries and their
coins (noise images, not private data) for the officer, who scores the released student on them
(``feddistill audit-deployment ... --device-canaries FILE``).
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import numpy as np

from feddistill.atomic import atomic_path

__all__ = ["CANARY_FILE", "RECORDS_KEY", "export_record_canaries", "load_record_canaries", "record_canaries"]

RECORDS_KEY = "canary-records"  # node config: how many canary records the device holds
CANARY_FILE = "canary-records.npz"  # in the device's data dir: x, y, included, device


def record_canaries(data_dir: Path, count: int, image_shape: tuple[int, ...], num_classes: int, device: int) -> dict:
    """The device's canaries: read from ``data_dir/canary-records.npz``, or made there (OS entropy) once."""
    path = data_dir / CANARY_FILE
    if path.is_file():
        saved = load_record_canaries(path)
        if len(saved["y"]) != count:
            raise ValueError(
                f"{path} holds {len(saved['y'])} canary records but node config {RECORDS_KEY} = {count}: "
                "a device's canaries are fixed once made; move the file away to make new ones"
            )
        return saved
    rng = np.random.default_rng(secrets.randbits(128))  # the coins are the device's secret
    made: dict[str, np.ndarray] = {
        "x": rng.random((count, *image_shape), dtype=np.float32),
        "y": rng.integers(0, num_classes, size=count).astype(np.int64),
        "included": rng.random(count) < 0.5,
        "device": np.asarray(device, dtype=np.int64),
    }
    with atomic_path(path) as tmp:
        np.savez(tmp, x=made["x"], y=made["y"], included=made["included"], device=made["device"])
    return made


def load_record_canaries(path: str | Path) -> dict:
    """A canary file (the device's own or an export): x, y, included, device."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            out = {k: npz[k] for k in ("x", "y", "included", "device")}
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path}: not a canary-records file (x, y, included, device): {exc}") from exc
    if out["x"].shape[0] != out["y"].shape[0] or out["y"].shape != out["included"].shape:
        raise ValueError(f"{path}: x {out['x'].shape}, y {out['y'].shape} and included differ in length")
    return out


def export_record_canaries(data_dir: str | Path, out: str | Path) -> Path:
    """What the officer needs after the run: the canaries and their coins (nothing private)."""
    source = Path(data_dir) / CANARY_FILE
    if not source.is_file():
        raise ValueError(f"{source}: no canary records (the device was not started with node config {RECORDS_KEY})")
    load_record_canaries(source)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, out)
    return out
