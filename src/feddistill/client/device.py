"""A device's own data: its private examples and its copy of the public reference set.

On a real device the SuperNode is started with ``--node-config 'data-dir="/path"'``; the
ClientApp then reads everything it trains on or answers about from that folder and
nothing else:

``private.npz``
    ``x`` float32 ``(N, 1, H, W)`` in [0, 1] and ``y`` int64 ``(N,)``: the device's private
    labelled examples. They never leave the device.
``reference.npz``
    ``x`` float32 ``(M, 1, H, W)``: the PUBLIC reference set, in the server's order (no
    labels). Its SHA-256 (:func:`feddistill.data.reference_digest`) must equal the digest the
    server sends each round, otherwise the device refuses to answer.

The device's persisted student and record-level privacy ledger live in ``data-dir/state``
(:func:`feddistill.client.state.state_dir`); with the node config ``canary-records=M`` its
canary records for the officer's audit live in ``data-dir/canary-records.npz``
(:mod:`feddistill.client.record_canaries`).

Without ``data-dir`` (simulation) the data come from the simulated fleet
(:func:`feddistill.data.fleet.load_fleet`), as before.
"""

from __future__ import annotations

import sys
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from flwr.app import Context

from feddistill.atomic import atomic_path
from feddistill.client.node import device_id, is_device
from feddistill.client.record_canaries import RECORDS_KEY, record_canaries
from feddistill.config import RunConfig
from feddistill.data import ArrayDataset, DataError, reference_digest

__all__ = [
    "PRIVATE_FILE",
    "REFERENCE_FILE",
    "ClientData",
    "client_data",
    "read_device_data",
    "write_device_data",
]

PRIVATE_FILE = "private.npz"
REFERENCE_FILE = "reference.npz"


class ClientData(NamedTuple):
    reference_x: torch.Tensor  # (M, 1, H, W) float32, the public reference set
    reference_digest: str  # SHA-256 of reference_x as the device holds it
    private_x: torch.Tensor  # (N, 1, H, W) float32
    private_y: torch.Tensor  # (N,) int64
    partition_id: int  # partition id (simulation) or device id (device)


def write_device_data(data_dir: str | Path, private: ArrayDataset, reference: ArrayDataset | np.ndarray) -> Path:
    """Write a device's ``private.npz`` (x, y) and ``reference.npz`` (x only) into ``data_dir``."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    ref_x = reference.x if isinstance(reference, ArrayDataset) else np.asarray(reference, dtype=np.float32)
    _save_npz(
        data_dir / PRIVATE_FILE,
        x=np.ascontiguousarray(private.x, dtype=np.float32),
        y=np.ascontiguousarray(private.y, dtype=np.int64),
    )
    _save_npz(data_dir / REFERENCE_FILE, x=np.ascontiguousarray(ref_x, dtype=np.float32))
    return data_dir


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:  # the temp file keeps the .npz suffix: np.savez adds none
        np.savez(tmp, **arrays)


def _load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(
            f"{path}: file not found; a device's data dir must hold {PRIVATE_FILE} (x, y) and "
            f"{REFERENCE_FILE} (x) (see feddistill.client.device.write_device_data)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"{path}: corrupt device data: missing array(s) {missing} (has {npz.files})")
            return {k: npz[k] for k in keys}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: corrupt device data, not a readable .npz file ({exc})") from exc


def _check_images(path: Path, x: np.ndarray) -> np.ndarray:
    if x.ndim != 4 or x.shape[1] != 1 or x.shape[0] == 0:
        raise DataError(f"{path}: corrupt device data: 'x' must have shape (N>0, 1, H, W), got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: corrupt device data: 'x' must be float, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


@lru_cache(maxsize=4)
def _read_cached(data_dir: str, private_mtime: int, reference_mtime: int) -> ClientData:
    del private_mtime, reference_mtime  # cache keys only: a rewritten file is read again
    base = Path(data_dir)
    private = _load_npz(base / PRIVATE_FILE, ("x", "y"))
    reference = _load_npz(base / REFERENCE_FILE, ("x",))
    px = _check_images(base / PRIVATE_FILE, private["x"])
    py = private["y"]
    if py.shape != (px.shape[0],) or not np.issubdtype(py.dtype, np.integer) or (py.size and py.min() < 0):
        raise DataError(
            f"{base / PRIVATE_FILE}: corrupt device data: 'y' must be non-negative integers of shape "
            f"({px.shape[0]},), got {py.dtype} {py.shape}"
        )
    rx = _check_images(base / REFERENCE_FILE, reference["x"])
    if rx.shape[2:] != px.shape[2:]:
        raise DataError(f"{base / REFERENCE_FILE}: images are {rx.shape[2:]} but {PRIVATE_FILE}'s are {px.shape[2:]}")
    return ClientData(
        reference_x=torch.from_numpy(rx),
        reference_digest=reference_digest(rx),
        private_x=torch.from_numpy(px),
        private_y=torch.from_numpy(np.ascontiguousarray(py, dtype=np.int64)),
        partition_id=-1,
    )


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return -1  # _read_cached raises the error that names the file


def read_device_data(data_dir: str | Path, partition_id: int = -1) -> ClientData:
    """A device's data from ``data_dir`` (cached per process, re-read when a file changes)."""
    base = Path(data_dir).expanduser().resolve()
    if not base.is_dir():
        raise DataError(f"{base}: device data dir not found (node config 'data-dir')")
    data = _read_cached(str(base), _mtime(base / PRIVATE_FILE), _mtime(base / REFERENCE_FILE))
    return data._replace(partition_id=partition_id)


def client_data(cfg: RunConfig, context: Context) -> ClientData:
    """What a client trains on and answers about.

    A device (node config ``data-dir``) reads only its own folder; a simulated client gets
    its partition of the simulated fleet (with the audit canaries, if any).
    """
    partition_id = device_id(context)
    if is_device(context):
        data = read_device_data(str(context.node_config["data-dir"]), partition_id)
        return with_record_canaries(data, context)
    from feddistill.data.fleet import as_tensors, fleet_canaries, load_fleet, training_data

    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    ref_x, _ = as_tensors(fleet.splits.reference)
    private_x, private_y = training_data(fleet, partition_id, fleet_canaries(cfg))
    return ClientData(ref_x, fleet.splits.reference_digest, private_x, private_y, partition_id)


def with_record_canaries(data: ClientData, context: Context) -> ClientData:
    """The device's data with its included canary records (node config ``canary-records``,
    :mod:`feddistill.client.record_canaries`) in the private training set."""
    raw = context.node_config.get(RECORDS_KEY)
    if raw is None or raw == "":
        return data
    try:
        count = int(str(raw))
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"node config {RECORDS_KEY} = {raw!r} must be an integer >= 1")
    base = Path(str(context.node_config["data-dir"])).expanduser().resolve()
    # labels in the range the device's own labels span: it holds no list of the task's classes
    num_classes = max(2, int(data.private_y.max()) + 1)
    can = record_canaries(base, count, tuple(data.private_x.shape[1:]), num_classes, data.partition_id)
    keep = can["included"]
    return data._replace(
        private_x=torch.cat([data.private_x, torch.from_numpy(can["x"][keep])]),
        private_y=torch.cat([data.private_y, torch.from_numpy(can["y"][keep])]),
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: split the configured data set's private pool into N device data dirs (a demo
    fleet for a real deployment: on real devices each owner writes its own private.npz)."""
    import argparse

    from feddistill.config import ConfigError, load_config, parse_override
    from feddistill.data.fleet import load_fleet

    parser = argparse.ArgumentParser(prog="python -m feddistill.client.device", description=main.__doc__)
    parser.add_argument("out_dir", type=Path, help="writes OUT_DIR/device-<i>/{private,reference}.npz")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--config", type=Path, default=None, help="TOML run config (data set, split sizes, seed)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="KEY=VALUE, e.g. data.dataset=digits"
    )
    args = parser.parse_args(argv)
    try:
        overrides = {**dict(parse_override(s) for s in args.overrides), "fleet.num_clients": args.devices}
        cfg = load_config(args.config, overrides)
        fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for i in range(args.devices):
        path = write_device_data(args.out_dir / f"device-{i}", fleet.private_data(i), fleet.splits.reference)
        print(f"{path}: {len(fleet.parts[i])} private examples, reference digest {fleet.splits.reference_digest[:16]}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
