"""Tests for feddistill.deploy.certs and feddistill.deploy.signing."""

from __future__ import annotations

import argparse
import base64
import http.client
import ipaddress
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from feddistill.deploy import certs
from feddistill.deploy.certs import generate_credentials, supernode_public_keys
from feddistill.deploy.signing import (
    KeyLoadError,
    ReleaseRejected,
    fingerprint,
    load_private_key,
    load_public_key,
    sign_release,
    signed_message,
    verify_release,
)

VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- #
# fixtures
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> certs.CredentialPaths:
    return generate_credentials(
        tmp_path_factory.mktemp("creds"),
        hosts=["localhost", "127.0.0.1", "superlink.example", "::1"],
        num_supernodes=2,
    )


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _snapshot(paths: certs.CredentialPaths) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths.all_files}


# --------------------------------------------------------------------------- #
# certificates
# --------------------------------------------------------------------------- #
def test_ca_is_self_signed_ca(creds: certs.CredentialPaths) -> None:
    ca = _load_cert(creds.ca_cert)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)  # self-signature valid
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign


def test_server_cert_signed_by_ca(creds: certs.CredentialPaths) -> None:
    ca = _load_cert(creds.ca_cert)
    server = _load_cert(creds.server_cert)
    # explicit signature check with the CA public key
    ca.public_key().verify(
        server.signature,
        server.tbs_certificate_bytes,
        ec.ECDSA(server.signature_hash_algorithm),
    )
    server.verify_directly_issued_by(ca)
    assert server.issuer == ca.subject
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku
    # server key matches server cert
    server_key = serialization.load_pem_private_key(creds.server_key.read_bytes(), None)
    assert server_key.public_key() == server.public_key()


def test_server_cert_not_signed_by_other_ca(creds: certs.CredentialPaths, tmp_path: Path) -> None:
    other = generate_credentials(tmp_path / "other", num_supernodes=0)
    server = _load_cert(creds.server_cert)
    other_ca = _load_cert(other.ca_cert)
    assert other_ca.subject == server.issuer  # same name, different key
    with pytest.raises(InvalidSignature):
        server.verify_directly_issued_by(other_ca)
    with pytest.raises(InvalidSignature):
        other_ca.public_key().verify(
            server.signature,
            server.tbs_certificate_bytes,
            ec.ECDSA(server.signature_hash_algorithm),
        )


def test_server_cert_sans(creds: certs.CredentialPaths) -> None:
    san = _load_cert(creds.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == [
        "localhost",
        "superlink.example",
    ]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }


def test_tls_handshake_with_ca_root(creds: certs.CredentialPaths, tmp_path: Path) -> None:
    """In-process TLS server with server.pem/server.key; client trusts only ca.crt."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(creds.server_cert, creds.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                return
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        good = ssl.create_default_context(cafile=str(creds.ca_cert))
        for name in ("localhost", "127.0.0.1"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with good.wrap_socket(raw, server_hostname=name) as tls:
                    assert tls.recv(2) == b"ok"
        # a CA that did not sign the server cert must be rejected
        other = generate_credentials(tmp_path / "other", num_supernodes=0)
        bad = ssl.create_default_context(cafile=str(other.ca_cert))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                bad.wrap_socket(raw, server_hostname="localhost")
        # a host name not in the SANs must be rejected
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                good.wrap_socket(raw, server_hostname="evil.example")
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


def test_private_key_permissions(creds: certs.CredentialPaths) -> None:
    assert len(creds.private_files) == 3 + 2
    for path in creds.private_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in creds.public_files:
        assert not stat.S_IMODE(path.stat().st_mode) & 0o022, path


def test_release_key_formats(creds: certs.CredentialPaths) -> None:
    priv_pem = creds.release_signing_key.read_bytes()
    pub_pem = creds.release_signing_pub.read_bytes()
    assert priv_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    assert pub_pem.startswith(b"-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo
    priv = load_private_key(creds.release_signing_key)
    pub = load_public_key(creds.release_signing_pub)
    assert fingerprint(priv.public_key()) == fingerprint(pub)


def test_second_call_refuses_and_leaves_files_identical(tmp_path: Path) -> None:
    paths = generate_credentials(tmp_path, num_supernodes=1)
    before = _snapshot(paths)
    with pytest.raises(FileExistsError) as info:
        generate_credentials(tmp_path, num_supernodes=1)
    msg = str(info.value)
    assert "--force" in msg and str(tmp_path) in msg
    assert _snapshot(paths) == before


def test_single_existing_file_blocks_everything(tmp_path: Path) -> None:
    (tmp_path / "supernode-1.pub").write_text("keep me")
    with pytest.raises(FileExistsError, match="supernode-1.pub"):
        generate_credentials(tmp_path, num_supernodes=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["supernode-1.pub"]
    assert (tmp_path / "supernode-1.pub").read_text() == "keep me"


def test_force_regenerates(tmp_path: Path) -> None:
    paths = generate_credentials(tmp_path, num_supernodes=3)
    before = _snapshot(paths)
    os.chmod(paths.ca_key, 0o644)  # force must restore 0600
    new = generate_credentials(tmp_path, num_supernodes=2, force=True)
    for path in new.all_files:
        assert path.read_bytes() != before[path], path
    for path in new.private_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # stale supernode-2 key pair removed, listing follows the new count
    assert supernode_public_keys(tmp_path) == list(new.supernode_public_keys)
    assert not (tmp_path / "supernode-2.key").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    _load_cert(new.server_cert).verify_directly_issued_by(_load_cert(new.ca_cert))


def test_supernode_public_keys_listing(tmp_path: Path) -> None:
    paths = generate_credentials(tmp_path, num_supernodes=11)
    listed = supernode_public_keys(tmp_path)
    assert listed == list(paths.supernode_public_keys)  # numeric, not lexical, order
    assert listed[10].name == "supernode-10.pub"
    with pytest.raises(FileNotFoundError):
        supernode_public_keys(tmp_path / "missing")


def test_cli_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs.main([str(tmp_path / "c"), "--supernodes", "1"]) == 0
    assert certs.main([str(tmp_path / "c"), "--supernodes", "1"]) == 1
    assert "--force" in capsys.readouterr().err
    assert certs.main([str(tmp_path / "c"), "--supernodes", "1", "--force"]) == 0


# --------------------------------------------------------------------------- #
# SuperNode auth keys, loaded exactly the way Flower 1.41 loads them
# --------------------------------------------------------------------------- #
def test_flower_loads_supernode_private_key(creds: certs.CredentialPaths) -> None:
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    for key_path, pub_path in zip(creds.supernode_private_keys, creds.supernode_public_keys):
        args = argparse.Namespace(auth_supernode_private_key=str(key_path), auth_supernode_public_key=None)
        result = _try_setup_client_authentication(args)
        assert result is not None
        priv, pub = result
        assert isinstance(priv, ec.EllipticCurvePrivateKey)
        assert isinstance(priv.curve, ec.SECP384R1)
        assert pub == serialization.load_ssh_public_key(pub_path.read_bytes())


def test_flower_cli_loads_supernode_public_key(creds: certs.CredentialPaths) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_public_key,
        public_key_to_bytes,
        sign_message,
        uses_nist_ec_curve,
        verify_signature,
    )

    pub_path = creds.supernode_public_keys[0]
    assert pub_path.read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
    registered = try_load_public_key(pub_path)  # what `flwr supernode register` sends
    # what the SuperLink's Control API checks on RegisterNode
    pub = bytes_to_public_key(registered)
    assert uses_nist_ec_curve(pub)
    # what the SuperNode presents (derived from its private key) must match
    priv = serialization.load_ssh_private_key(creds.supernode_private_keys[0].read_bytes(), None)
    assert public_key_to_bytes(priv.public_key()) == registered
    # Fleet node-auth: SuperNode signs a timestamp, SuperLink verifies
    sig = sign_message(priv, b"2026-01-01T00:00:00+00:00")
    assert verify_signature(pub, b"2026-01-01T00:00:00+00:00", sig)
    other = bytes_to_public_key(try_load_public_key(creds.supernode_public_keys[1]))
    assert not verify_signature(other, b"2026-01-01T00:00:00+00:00", sig)


# --------------------------------------------------------------------------- #
# signed releases
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def keypair() -> tuple[ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key, key.public_key()


PAYLOAD = b"teacher-logits:" + bytes(range(256)) * 4


def _reason(exc_info: pytest.ExceptionInfo[ReleaseRejected]) -> str:
    return exc_info.value.reason


def test_sign_verify_roundtrip(keypair) -> None:  # type: ignore[no-untyped-def]
    priv, pub = keypair
    sig = sign_release(priv, PAYLOAD, round=3, release_id="teacher-r3")
    assert len(base64.b64decode(sig)) == 64
    verify_release(pub, PAYLOAD, round=3, release_id="teacher-r3", signature=sig)
    verify_release(pub, PAYLOAD, round=3, release_id="teacher-r3", signature=sig, min_round=3)
    verify_release(pub, PAYLOAD, round=3, release_id="teacher-r3", signature=sig, min_round=0)


@pytest.mark.parametrize(
    "change",
    ["payload", "round", "release_id", "key", "run_id", "signature_bits", "garbage"],
)
def test_tampered(keypair, change: str) -> None:  # type: ignore[no-untyped-def]
    priv, pub = keypair
    sig = sign_release(priv, PAYLOAD, round=3, release_id="student-r3")
    kwargs = dict(round=3, release_id="student-r3", signature=sig)
    payload, key = PAYLOAD, pub
    if change == "payload":
        payload = PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 1])
    elif change == "round":
        kwargs["round"] = 4
    elif change == "release_id":
        kwargs["release_id"] = "student-r3x"
    elif change == "key":
        key = ed25519.Ed25519PrivateKey.generate().public_key()
    elif change == "run_id":
        kwargs["run_id"] = 7
    elif change == "signature_bits":
        raw = bytearray(base64.b64decode(sig))
        raw[0] ^= 0x80
        kwargs["signature"] = base64.b64encode(bytes(raw)).decode()
    elif change == "garbage":
        kwargs["signature"] = "not base64 !!"
    with pytest.raises(ReleaseRejected) as info:
        verify_release(key, payload, **kwargs)
    assert info.value.kind == "tampered"
    assert _reason(info).startswith("tampered")


def test_run_id_binding(keypair) -> None:  # type: ignore[no-untyped-def]
    priv, pub = keypair
    sig = sign_release(priv, PAYLOAD, round=1, release_id="r", run_id=42)
    verify_release(pub, PAYLOAD, round=1, release_id="r", signature=sig, run_id="42")
    with pytest.raises(ReleaseRejected, match="tampered"):
        verify_release(pub, PAYLOAD, round=1, release_id="r", signature=sig)


def test_replayed(keypair) -> None:  # type: ignore[no-untyped-def]
    priv, pub = keypair
    sig = sign_release(priv, PAYLOAD, round=2, release_id="teacher-r2")
    with pytest.raises(ReleaseRejected) as info:
        verify_release(pub, PAYLOAD, round=2, release_id="teacher-r2", signature=sig, min_round=5)
    assert _reason(info) == "replayed: round 2 older than last accepted 5"
    assert info.value.kind == "replayed"


@pytest.mark.parametrize("sig", ["", "   ", None, b""])
def test_unsigned(keypair, sig) -> None:  # type: ignore[no-untyped-def]
    _, pub = keypair
    with pytest.raises(ReleaseRejected) as info:
        verify_release(pub, PAYLOAD, round=1, release_id="x", signature=sig)
    assert info.value.kind == "unsigned"
    assert _reason(info).startswith("unsigned")


def test_signed_message_canonical() -> None:
    h = "ab" * 32
    msg = signed_message(h, 7, "rel", run_id=9)
    assert msg.startswith(b"feddistill-release-v1")
    assert msg == signed_message(h, 7, "rel", run_id="9")
    # length prefixes: shifting characters between fields changes the bytes
    assert signed_message(h, 1, "1x") != signed_message(h, 11, "x")
    assert signed_message(h, 1, "a", run_id="bc") != signed_message(h, 1, "ab", run_id="c")
    assert len(msg) == len(b"feddistill-release-v1") + 4 * 4 + 64 + 1 + 3 + 1
    with pytest.raises(ValueError):
        signed_message("XYZ", 1, "r")
    with pytest.raises(ValueError):
        signed_message(h, -1, "r")
    with pytest.raises(TypeError):
        signed_message(h, True, "r")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        signed_message(h, 1, "")


def test_fingerprint(keypair) -> None:  # type: ignore[no-untyped-def]
    priv, pub = keypair
    fp = fingerprint(pub)
    assert len(fp) == 32 and int(fp, 16) >= 0
    assert fingerprint(priv) == fp
    assert fingerprint(ed25519.Ed25519PrivateKey.generate().public_key()) != fp


# --------------------------------------------------------------------------- #
# key loading errors
# --------------------------------------------------------------------------- #
def test_load_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pub"
    with pytest.raises(FileNotFoundError, match="nope.pub"):
        load_public_key(missing)
    with pytest.raises(FileNotFoundError, match="nope.key"):
        load_private_key(tmp_path / "nope.key")


def test_load_wrong_key_type(creds: certs.CredentialPaths) -> None:
    # EC P-384 PEM public key (the server's) is not Ed25519
    ec_pub = creds.out_dir / "server-pub.pem"
    server = _load_cert(creds.server_cert)
    ec_pub.write_bytes(
        server.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(KeyLoadError, match="Ed25519") as info:
        load_public_key(ec_pub)
    assert str(ec_pub) in str(info.value)
    # OpenSSH ECDSA SuperNode public key is not Ed25519 either
    with pytest.raises(KeyLoadError, match="Ed25519"):
        load_public_key(creds.supernode_public_keys[0])
    # EC private keys (PEM PKCS8 and OpenSSH) rejected for signing
    with pytest.raises(KeyLoadError, match=r"server\.key.*Ed25519"):
        load_private_key(creds.server_key)
    with pytest.raises(KeyLoadError, match="Ed25519"):
        load_private_key(creds.supernode_private_keys[0])


def test_load_garbage_and_swapped(creds: certs.CredentialPaths, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pub"
    junk.write_text("hello")
    with pytest.raises(KeyLoadError, match="junk.pub"):
        load_public_key(junk)
    with pytest.raises(KeyLoadError, match="PRIVATE"):
        load_public_key(creds.release_signing_key)
    with pytest.raises(KeyLoadError):
        load_private_key(creds.release_signing_pub)


def test_load_openssh_ed25519(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "k").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "k.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    assert fingerprint(load_private_key(tmp_path / "k")) == fingerprint(load_public_key(tmp_path / "k.pub"))


# --------------------------------------------------------------------------- #
# real flower-superlink over TLS (loopback only, bounded, always killed)
# --------------------------------------------------------------------------- #
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _https_get(host: str, port: int, ctx: ssl.SSLContext, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=3)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.skipif(
    not (VENV_BIN / "flower-superlink").exists() or os.environ.get("FEDDISTILL_SKIP_SUPERLINK_SMOKE") == "1",
    reason="flower-superlink not available",
)
def test_superlink_tls_smoke(creds: certs.CredentialPaths, tmp_path: Path) -> None:
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(tmp_path / "flwr-home"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    (tmp_path / "flwr-home").mkdir()
    port = _free_port()
    log_path = tmp_path / "superlink.log"
    cmd = [
        str(VENV_BIN / "flower-superlink"),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--isolation", "process",  # no SuperExec child process
        "--enable-supernode-auth",
        *creds.superlink_tls_args(),
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    try:
        ctx = ssl.create_default_context(cafile=str(creds.ca_cert))
        deadline = time.monotonic() + 15
        status = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            try:
                status, _ = _https_get("127.0.0.1", port, ctx, "/health")
                break
            except (ConnectionError, OSError):
                time.sleep(0.1)
        assert status == 200, log_path.read_text()
        assert _https_get("localhost", port, ctx, "/health")[0] == 200

        # TLS really enforced: an unrelated CA is rejected
        other = generate_credentials(tmp_path / "other", num_supernodes=0)
        with pytest.raises(ssl.SSLCertVerificationError):
            _https_get(
                "127.0.0.1", port, ssl.create_default_context(cafile=str(other.ca_cert)),
                "/health",
            )  # fmt: skip

        # register a SuperNode public key exactly as a deployment would
        (tmp_path / "flwr-home" / "config.toml").write_text(
            "[superlink]\n"
            'default = "feddistill"\n\n'
            "[superlink.feddistill]\n"
            f'address = "127.0.0.1:{port}"\n'
            f'root-certificates = "{creds.ca_cert.resolve()}"\n'
        )
        out = subprocess.run(
            [
                str(VENV_BIN / "flwr"), "supernode", "register",
                str(creds.supernode_public_keys[0]), "feddistill", "--format", "json",
            ],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        result = json.loads(out.stdout[out.stdout.index("{") :])
        assert result["success"] is True and int(result["node-id"]) > 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
