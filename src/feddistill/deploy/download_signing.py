"""Signed downloads: the server signs every round's download (the teacher signal, and the global
student when it sends it); a client that pins the server's Ed25519 public key refuses unsigned,
tampered or replayed ones (``feddistill.deploy.signing``: Ed25519 over SHA-256 of the payload,
round, download id and run id).

A download's id (:func:`download_id`, sent under the ``release-id`` key) names the round's
download; the versioned releases of the global student and their ids (``r0003``) are
``feddistill.server.gate``'s.

The payload is the round's whole download (the ArrayRecord): every array's name, dtype,
shape and bytes, in name order, so no array can be swapped, reshaped or reinterpreted.
The last accepted (run, round) is kept in the device's state folder, so a fresh ClientApp
process still recognises a replay of an older round of the same run.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord

from feddistill import protocol
from feddistill.atomic import atomic_path
from feddistill.deploy.signing import load_private_key, load_public_key, sign_release, verify_release


def payload(arrays: ArrayRecord) -> bytes:
    parts = []
    for name in sorted(arrays.keys()):
        array = arrays[name]
        header = json.dumps([name, array.dtype, list(array.shape)]).encode()
        parts += [len(header).to_bytes(4, "big"), header, len(array.data).to_bytes(8, "big"), bytes(array.data)]
    return b"".join(parts)


def download_id(rnd: int) -> str:
    """The id a round's download is signed under (not a release of the gate: ``server.gate.release_id``)."""
    return f"teacher-signal-round-{rnd}"


@lru_cache(maxsize=4)
def _private_key(path: str):
    return load_private_key(path)


@lru_cache(maxsize=4)
def _public_key(path: str):
    return load_public_key(path)


def sign_download(config: ConfigRecord, arrays: ArrayRecord, *, key_path: str, rnd: int, run_id: int) -> None:
    config[protocol.RELEASE_ID] = download_id(rnd)
    config[protocol.SIGNATURE] = sign_release(
        _private_key(key_path), payload(arrays), round=rnd, release_id=download_id(rnd), run_id=run_id
    )


def verify_download(
    config: ConfigRecord, arrays: ArrayRecord, *, key_path: str, rnd: int, run_id: int, state: Path
) -> None:
    """Raise ``ReleaseRejected`` unless the download is signed by the pinned key and not a replay."""
    record = state / "last-release.json"
    last = json.loads(record.read_text()) if record.is_file() else {}
    min_round = last.get("round") if last.get("run_id") == run_id else None
    verify_release(
        _public_key(key_path),
        payload(arrays),
        round=rnd,
        release_id=str(config.get(protocol.RELEASE_ID, "")),
        signature=config.get(protocol.SIGNATURE),
        min_round=min_round,
        run_id=run_id,
    )
    if str(config.get(protocol.RELEASE_ID)) != download_id(rnd):
        from feddistill.deploy.signing import ReleaseRejected

        raise ReleaseRejected(f"tampered: release id {config.get(protocol.RELEASE_ID)!r} is not round {rnd}'s")
    with atomic_path(record) as tmp:
        tmp.write_text(json.dumps({"run_id": run_id, "round": rnd}))
