"""A device install's self-check: can this environment run the ClientApp's rounds?

``python -m feddistill.deploy.device_check`` (add ``--json`` for a machine-readable line) on a
device, after ``pip install torch==2.13.0`` and ``pip install feddistill`` without extras (the
device profile, README "Run on real devices"). It plays the SuperNode's part in-process on small
synthetic data written as a device's ``data-dir``, and sends the real ClientApp handler
(:func:`feddistill.client.distill.handle_distill`) one request of each kind a device answers:

- ``plain``: digest, revisit, answer, with the device's noise from OS entropy;
- ``signed``: the same with a pinned release-signing key and a signed download
  (:mod:`feddistill.deploy.download_signing`);
- ``dp-sgd``: record-level DP: DP-SGD through Opacus, charged to the device's ledger
  (dp-accounting), whose ε comes back in the reply;
- ``secagg+``: SecAgg+'s masking-stage call (:func:`feddistill.client.secagg.answers_as_fitres`);
  the masking itself is Flower's ``secaggplus_mod``, imported with that module.

Each must come back without an error. It then lists which of
:data:`feddistill.profiles.DEVICE_EXCLUDED` got imported on the way: none may, since the device
profile does not install them. The request is built with the server's own
:func:`feddistill.server.loop.round_config`, so it has exactly the keys a real round has.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from feddistill import protocol
from feddistill.client.device import write_device_data
from feddistill.client.distill import handle_distill
from feddistill.config import RunConfig, load_config
from feddistill.data import ArrayDataset, reference_digest
from feddistill.profiles import DEVICE_EXCLUDED

__all__ = ["check_device", "heavy_modules_loaded", "main"]

IMAGE, CLASSES, PRIVATE, REFERENCE, QUERIES = 8, 10, 64, 40, 32
SETTINGS = {  # small rounds; a device's noise always comes from OS entropy
    "rounds": 1,
    "fleet.num_clients": 3,
    "distill.digest_epochs": 1,
    "distill.revisit_epochs": 1,
    "privacy.noise_source": "os-entropy",
}
KINDS: dict[str, dict] = {
    "plain": {},
    "signed": {},  # and a pinned key, below
    "dp-sgd": {"privacy.record_level": True, "privacy.record_noise_multiplier": 1.0},
    "secagg+": {"distill.secure_aggregation": "secagg+"},
}


def heavy_modules_loaded() -> list[str]:
    """The packages the device profile leaves out (:data:`~feddistill.profiles.DEVICE_EXCLUDED`)
    that this process has imported."""
    return sorted(name for name in DEVICE_EXCLUDED if name in sys.modules)


def _device_data(workdir: Path) -> tuple[Path, str]:
    """Synthetic images written as a device owner would: ``private.npz`` and ``reference.npz``."""
    rng = np.random.default_rng(0)
    private = ArrayDataset(
        rng.random((PRIVATE, 1, IMAGE, IMAGE), dtype=np.float32), np.arange(PRIVATE) % CLASSES, CLASSES
    )
    reference = rng.random((REFERENCE, 1, IMAGE, IMAGE), dtype=np.float32)
    return write_device_data(workdir / "device", private, reference), reference_digest(reference)


def _request(cfg: RunConfig, digest: str, rnd: int) -> Message:
    """A ``train.distill`` request as the server sends it: round config, queries, teacher signal."""
    from feddistill.privacy.plan import run_privacy
    from feddistill.server.loop import round_config

    config = round_config(cfg, digest, run_privacy(cfg))
    config[protocol.ROUND] = rnd
    signal = np.full((QUERIES, CLASSES), 1.0 / CLASSES, np.float32)
    teacher = ArrayRecord({protocol.SIGNAL: Array(signal), protocol.QUERIES: Array(np.arange(QUERIES, dtype=np.int64))})
    content = RecordDict({protocol.TEACHER_RECORD: teacher, protocol.CONFIG_RECORD: config})
    return Message(content, dst_node_id=1, message_type=protocol.DISTILL)


def _sign(msg: Message, workdir: Path, rnd: int) -> str:
    """Sign the download with a fresh release-signing key; the public key's path, to pin."""
    from feddistill.deploy.certs import generate_credentials
    from feddistill.deploy.download_signing import sign_download

    paths = generate_credentials(workdir / "certs", num_supernodes=1)
    config = msg.content.config_records[protocol.CONFIG_RECORD]
    teacher = msg.content.array_records[protocol.TEACHER_RECORD]
    sign_download(config, teacher, key_path=str(paths.release_signing_key), rnd=rnd, run_id=msg.metadata.run_id)
    return str(paths.release_signing_pub)


def _secagg_round(msg: Message, context: Context, cfg: RunConfig) -> Message:
    """The request as SecAgg+'s masking stage carries it (Flower's legacy FitIns), answered."""
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from feddistill.client.secagg import ARRAY_NAMES, answers_as_fitres

    teacher = msg.content.array_records[protocol.TEACHER_RECORD]
    config = dict(msg.content.config_records[protocol.CONFIG_RECORD])
    config[ARRAY_NAMES] = json.dumps(list(teacher.keys()))
    fitins = FitIns(ndarrays_to_parameters([teacher[k].numpy() for k in teacher.keys()]), config)
    legacy = Message(compat.fitins_to_recorddict(fitins, keep_input=True), dst_node_id=1, message_type="train")
    return answers_as_fitres(legacy, context, cfg, handle_distill)


def _round(kind: str, workdir: Path, data_dir: Path, digest: str) -> dict:
    """One request of ``kind`` through the ClientApp's handler: what came back, and how long it took."""
    cfg = load_config(None, {**SETTINGS, **KINDS[kind], "output_dir": str(workdir / "run")})
    node_config: dict = {"device-id": 0, "data-dir": str(data_dir)}
    msg = _request(cfg, digest, rnd=1)
    if kind == "signed":
        node_config["release-public-key"] = _sign(msg, workdir, rnd=1)
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    answer: Callable[[Message, Context, RunConfig], Message] = _secagg_round if kind == "secagg+" else handle_distill
    start = time.monotonic()
    try:
        reply = answer(msg, context, cfg)
    except Exception as exc:  # a self-check reports every failure, whatever raised it (SecAgg+ refusals raise)
        return {"ok": False, "seconds": time.monotonic() - start, "error": f"{type(exc).__name__}: {exc}"}
    seconds = time.monotonic() - start
    if reply.has_error():
        return {"ok": False, "seconds": seconds, "error": reply.error.reason}
    metrics = dict(next(iter(reply.content.metric_records.values()), {}))
    return {"ok": True, "seconds": seconds, "metrics": metrics}


def check_device(workdir: Path | None = None) -> dict:
    """Run one request of every kind (:data:`KINDS`) through the ClientApp; the results, and the
    excluded packages imported on the way (``heavy_imported``: must be empty)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # what a SuperNode sets
    with tempfile.TemporaryDirectory(prefix="feddistill-device-check-") as tmp:
        base = Path(workdir or tmp)
        rounds = {}
        for kind in KINDS:
            data_dir, digest = _device_data(base / kind)  # a fresh device: its own state and ledger
            rounds[kind] = _round(kind, base / kind, data_dir, digest)
    ok = all(r["ok"] for r in rounds.values())
    heavy = heavy_modules_loaded()
    return {"ok": ok and not heavy, "rounds": rounds, "heavy_imported": heavy, "python": sys.executable}


def main(argv: list[str] | None = None) -> int:
    """Check that this environment runs the ClientApp's rounds (exit code 1 if not)."""
    parser = argparse.ArgumentParser(prog="python -m feddistill.deploy.device_check", description=main.__doc__)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    result = check_device()
    if args.json:
        print(json.dumps(result))
    else:
        for kind, r in result["rounds"].items():
            print(f"{kind:8} {'ok' if r['ok'] else 'FAILED: ' + r['error']} ({r['seconds']:.1f} s)")
        print(f"excluded packages imported: {', '.join(result['heavy_imported']) or 'none'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
