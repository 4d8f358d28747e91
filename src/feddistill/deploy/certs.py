"""TLS certificates and SuperNode authentication keys for a Flower 1.41 deployment.

Everything here uses only the ``cryptography`` package (no ``openssl``).

What Flower 1.41.0 expects (read from the installed ``flwr`` sources)
======================================================================

SuperLink (``flwr/superlink/cli/flower_superlink.py``)
    * Control, Fleet and Runtime APIs are served together over HTTPS
      (FastAPI + uvicorn, protobuf-over-HTTP) on ONE port given by
      ``--host`` (default ``127.0.0.1``) and ``--port`` (default ``8000``).
      ``--fleet-api-address`` / ``--control-api-address`` / ``--fleet-api-type``
      are deprecated (ignored, only warn); ``--serverappio-api-address`` and
      ``--appio-ssl-*`` are rejected.
    * TLS: ``--ssl-ca-certfile ca.crt --ssl-certfile server.pem
      --ssl-keyfile server.key``; all three are required together
      (``flwr.common.args.try_obtain_server_certificates``), otherwise
      ``--insecure``. uvicorn serves ``server.pem``/``server.key``; the CA file
      is handed as ``--root-certificates`` to the auto-started
      ``flower-superexec`` (``--isolation subprocess``, the default), which
      connects to ``<host>:<port>`` (``0.0.0.0`` is rewritten to
      ``127.0.0.1``), so the server certificate must carry the SAN
      ``IP:127.0.0.1`` in addition to every name SuperNodes / the CLI use.
    * ``--enable-supernode-auth`` requires TLS (exits with ``--insecure``).
      With it the Fleet API refuses self-registration
      (``FLEET_SUPERNODE_REGISTRATION_DISABLED``): every SuperNode public key
      must be registered beforehand with ``flwr supernode register``.
      There is NO SuperLink-side key list any more: ``--auth-list-public-keys``
      (the old CSV) makes ``flower-superlink`` exit with an error. Registered
      keys live in the LinkState database (``--database``; the default
      ``:flwr-in-memory:`` is lost on restart -> re-register after each restart,
      or pass ``--database /path/state.db``).

SuperNode (``flwr/supernode/cli/flower_supernode.py``)
    * ``flower-supernode --superlink HOST:PORT --root-certificates ca.crt
      --auth-supernode-private-key supernode-<i>.key
      --node-config "partition-id=<i> num-partitions=<n>" --port <unique>``.
      ``--superlink`` is the SuperLink's single HTTPS ``host:port``;
      ``--port`` (default 9094) is the SuperNode's own Runtime API port and
      must differ per SuperNode on one host. (``--ssl-*`` on the SuperNode are
      only for that local Runtime API and are optional.)
    * Private key format: OpenSSH private key, unencrypted, EC
      (``cryptography`` ``load_ssh_private_key(data, None)`` must return an
      ``EllipticCurvePrivateKey``). ``--auth-supernode-public-key`` is
      deprecated (public key is derived from the private key). Flower signs a
      timestamp with ECDSA/SHA-256; the SuperLink accepts any NIST curve
      (``uses_nist_ec_curve``); Flower itself generates SECP384R1, so we do too.
    * A SuperNode started WITH a private key never self-registers (even when
      the SuperLink has auth disabled): it only calls ``ActivateNode`` and
      exits with "Failed to initialize the connection" if its key is not
      registered. Without a key it generates an ephemeral one and
      self-registers (only possible when SuperLink auth is disabled).

Registration (``flwr/cli/supernode/register.py``)
    * ``flwr supernode register <PUBLIC_KEY_FILE> [SUPERLINK_CONNECTION]
      [--name NAME] [--location "lat,lon"] [--format json]``.
      The public key file is OpenSSH format (``ecdsa-sha2-nistp384 AAAA...``,
      loaded with ``load_ssh_public_key``). It needs no run and no federation
      argument: it is a Control API call to the running SuperLink; the node is
      owned by the CLI account (``none`` in OSS, default federation
      ``@none/default``). Order: start SuperLink -> register every key ->
      start SuperNodes. Also: ``flwr supernode ls``,
      ``flwr supernode unregister <node-id>``.

``flwr`` CLI connection config
    * 1.41 reads SuperLink connections from ``$FLWR_HOME/config.toml``
      (default ``~/.flwr/config.toml``), not from ``pyproject.toml``::

          [superlink]
          default = "feddistill"

          [superlink.feddistill]
          address = "127.0.0.1:8000"                 # SuperLink --host:--port
          root-certificates = "/ABS/PATH/ca.crt"     # must be an absolute path
          # insecure = true                          # instead, for plain HTTP
          # federation = "@none/default"             # optional

      then ``flwr run <app-dir> feddistill --stream``.
    * Legacy ``[tool.flwr.federations.*]`` (keys ``address``,
      ``root-certificates``, ``insecure``) in an app's ``pyproject.toml`` is
      auto-MIGRATED by any ``flwr`` command run on that app: copied into
      ``config.toml`` and the section is commented out in ``pyproject.toml``
      (the file is rewritten). A relative ``root-certificates`` is resolved
      against the app directory during that migration.

Files produced by :func:`generate_credentials` (private keys mode 0600)::

    ca.crt  ca.key                       self-signed CA (EC P-384)
    server.pem  server.key               server cert signed by the CA, SANs=hosts
    release-signing.key / .pub           Ed25519, PEM PKCS8 / PEM SubjectPublicKeyInfo
    supernode-<i>.key / supernode-<i>.pub   OpenSSH EC P-384 key pair, i = 0..n-1

CLI: ``python -m feddistill.deploy.certs OUT_DIR [--host H ...] [--supernodes N]
[--force]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from feddistill.atomic import atomic_path

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "RELEASE_SIGNING_KEY",
    "RELEASE_SIGNING_PUB",
    "CredentialPaths",
    "generate_credentials",
    "supernode_private_key_name",
    "supernode_public_key_name",
    "supernode_public_keys",
    "main",
]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
RELEASE_SIGNING_KEY = "release-signing.key"
RELEASE_SIGNING_PUB = "release-signing.pub"
_SUPERNODE_RE = re.compile(r"^supernode-(\d+)\.(key|pub)$")
_DEFAULT_HOSTS = ("localhost", "127.0.0.1")


def supernode_private_key_name(index: int) -> str:
    """File name of SuperNode ``index``'s OpenSSH private key."""
    return f"supernode-{index}.key"


def supernode_public_key_name(index: int) -> str:
    """File name of SuperNode ``index``'s OpenSSH public key."""
    return f"supernode-{index}.pub"


@dataclass(frozen=True)
class CredentialPaths:
    """Paths of all files written by :func:`generate_credentials`."""

    out_dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    release_signing_key: Path
    release_signing_pub: Path
    supernode_private_keys: tuple[Path, ...] = field(default_factory=tuple)
    supernode_public_keys: tuple[Path, ...] = field(default_factory=tuple)
    hosts: tuple[str, ...] = _DEFAULT_HOSTS

    @property
    def private_files(self) -> tuple[Path, ...]:
        """All private-key files (written with mode 0600)."""
        return (
            self.ca_key,
            self.server_key,
            self.release_signing_key,
            *self.supernode_private_keys,
        )

    @property
    def public_files(self) -> tuple[Path, ...]:
        """All certificate / public-key files."""
        return (
            self.ca_cert,
            self.server_cert,
            self.release_signing_pub,
            *self.supernode_public_keys,
        )

    @property
    def all_files(self) -> tuple[Path, ...]:
        """Every file written."""
        return self.private_files + self.public_files

    def superlink_tls_args(self) -> list[str]:
        """``flower-superlink`` TLS flags for these credentials."""
        return [
            "--ssl-ca-certfile",
            str(self.ca_cert),
            "--ssl-certfile",
            str(self.server_cert),
            "--ssl-keyfile",
            str(self.server_key),
        ]

    def supernode_auth_args(self, index: int) -> list[str]:
        """``flower-supernode`` TLS + authentication flags for SuperNode ``index``."""
        return [
            "--root-certificates",
            str(self.ca_cert),
            "--auth-supernode-private-key",
            str(self.supernode_private_keys[index]),
        ]


def _layout(out_dir: Path, num_supernodes: int, hosts: Sequence[str]) -> CredentialPaths:
    return CredentialPaths(
        out_dir=out_dir,
        ca_cert=out_dir / CA_CERT,
        ca_key=out_dir / CA_KEY,
        server_cert=out_dir / SERVER_CERT,
        server_key=out_dir / SERVER_KEY,
        release_signing_key=out_dir / RELEASE_SIGNING_KEY,
        release_signing_pub=out_dir / RELEASE_SIGNING_PUB,
        supernode_private_keys=tuple(out_dir / supernode_private_key_name(i) for i in range(num_supernodes)),
        supernode_public_keys=tuple(out_dir / supernode_public_key_name(i) for i in range(num_supernodes)),
        hosts=tuple(hosts),
    )


def _normalize_hosts(hosts: Sequence[str]) -> list[str]:
    if isinstance(hosts, str):
        hosts = [hosts]
    out: list[str] = []
    for host in hosts:
        host = str(host).strip()
        if host.startswith("[") and host.endswith("]"):  # "[::1]" -> "::1"
            host = host[1:-1]
        if host.endswith(".") and host != ".":  # a fully qualified name's trailing dot
            host = host[:-1]
        if not host:
            raise ValueError("empty host name in hosts")
        _check_host(host)
        if host not in out:
            out.append(host)
    if not out:
        raise ValueError("hosts must contain at least one host name or IP address")
    return out


_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _check_host(host: str) -> None:
    """A certificate names its server by IP address or DNS name (RFC 1123 labels: letters,
    digits and inner hyphens, 63 characters each, 253 in all); anything else would be
    written into the certificate as a name no client can ever match."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if len(host) > 253 or not all(_DNS_LABEL.match(label) for label in host.split(".")):
        raise ValueError(
            f"host {host!r}: not an IP address or a DNS host name "
            "(dot-separated labels of letters, digits and inner hyphens)"
        )


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_atomic(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` to ``path`` via a temp file + rename; private files are created 0600
    before any byte is written, so they are never readable by others, not even briefly."""
    with atomic_path(path, mode=0o600 if private else 0o644, durable=True) as tmp:
        tmp.write_bytes(data)


def _write_new(path: Path, data: bytes, *, private: bool) -> None:
    """Create ``path`` exclusively (O_EXCL) with mode 0600/0644."""
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _pem_pkcs8(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _build_ca(now: _dt.datetime, valid_days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "feddistill"),
            x509.NameAttribute(NameOID.COMMON_NAME, "feddistill deployment CA"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _build_server(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str],
    now: _dt.datetime,
    valid_days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "feddistill"),
            x509.NameAttribute(NameOID.COMMON_NAME, hosts[0][:64]),
        ]
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    not_after = min(now + _dt.timedelta(days=valid_days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def generate_credentials(
    out_dir: Path,
    *,
    hosts: Sequence[str] = _DEFAULT_HOSTS,
    num_supernodes: int = 3,
    force: bool = False,
    valid_days: int = 365,
) -> CredentialPaths:
    """Create CA, server TLS cert, release-signing key and SuperNode auth keys.

    Nothing is written if any target file already exists and ``force`` is
    False (``FileExistsError`` naming the file). With ``force=True`` every file
    is replaced atomically, and stale ``supernode-<i>.key/.pub`` files with
    ``i >= num_supernodes`` are removed.
    """
    _check_request(num_supernodes, valid_days)
    host_list = _normalize_hosts(hosts)

    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = _layout(out_dir, num_supernodes, host_list)

    if not force:
        for path in paths.all_files:
            if os.path.lexists(path):
                raise FileExistsError(
                    f"refusing to overwrite existing credential file '{path}'; "
                    "pass --force (force=True) to regenerate all credentials"
                )

    for path, data, private in _credential_contents(paths, host_list, valid_days, num_supernodes):
        if force:
            _write_atomic(path, data, private=private)
        else:
            _write_new(path, data, private=private)

    if force:
        for stale in out_dir.iterdir():
            match = _SUPERNODE_RE.match(stale.name)
            if match and int(match.group(1)) >= num_supernodes:
                stale.unlink()
    return paths


def _check_request(num_supernodes: int, valid_days: int) -> None:
    if isinstance(num_supernodes, bool) or not isinstance(num_supernodes, int):
        raise TypeError("num_supernodes must be an int")
    if num_supernodes < 0:
        raise ValueError("num_supernodes must be >= 0")
    if valid_days < 1:
        raise ValueError("valid_days must be >= 1")


def _credential_contents(
    paths: CredentialPaths, host_list: list[str], valid_days: int, num_supernodes: int
) -> list[tuple[Path, bytes, bool]]:
    """(path, bytes, is private) of every credential file: CA, server TLS, release signing, SuperNodes."""
    now = _dt.datetime.now(_dt.UTC)
    ca_key, ca_cert = _build_ca(now, valid_days)
    server_key, server_cert = _build_server(ca_key, ca_cert, host_list, now, valid_days)
    release_key = ed25519.Ed25519PrivateKey.generate()

    contents: list[tuple[Path, bytes, bool]] = [
        (paths.ca_key, _pem_pkcs8(ca_key), True),
        (paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), False),
        (paths.server_key, _pem_pkcs8(server_key), True),
        (paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), False),
        (paths.release_signing_key, _pem_pkcs8(release_key), True),
        (
            paths.release_signing_pub,
            release_key.public_key().public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo,
            ),
            False,
        ),
    ]
    for i in range(num_supernodes):
        contents.extend(_supernode_contents(paths, i))
    return contents


def _supernode_contents(paths: CredentialPaths, i: int) -> list[tuple[Path, bytes, bool]]:
    """SuperNode ``i``'s auth key pair (OpenSSH format): the private key and its public key."""
    node_key = ec.generate_private_key(ec.SECP384R1())
    return [
        (
            paths.supernode_private_keys[i],
            node_key.private_bytes(
                encoding=serialization.Encoding.PEM,
                format=serialization.PrivateFormat.OpenSSH,
                encryption_algorithm=serialization.NoEncryption(),
            ),
            True,
        ),
        (
            paths.supernode_public_keys[i],
            node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + f" feddistill-supernode-{i}\n".encode(),
            False,
        ),
    ]


def supernode_public_keys(out_dir: Path) -> list[Path]:
    """OpenSSH public keys ``supernode-<i>.pub`` in ``out_dir``, sorted by ``i``.

    Feed each to ``flwr supernode register <path> <connection>``.
    """
    out_dir = Path(out_dir).expanduser()
    if not out_dir.is_dir():
        raise FileNotFoundError(f"credential directory '{out_dir}' does not exist")
    found: list[tuple[int, Path]] = []
    for path in out_dir.iterdir():
        match = _SUPERNODE_RE.match(path.name)
        if match and match.group(2) == "pub" and path.is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: generate deployment credentials."""
    parser = argparse.ArgumentParser(
        prog="python -m feddistill.deploy.certs",
        description="Generate TLS certificates, release-signing and SuperNode keys.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=None,
        help="Host name or IP for the server certificate SAN (repeatable; default: localhost and 127.0.0.1).",
    )
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--valid-days", type=int, default=365)
    parser.add_argument("--force", action="store_true", help="Overwrite existing files.")
    args = parser.parse_args(argv)
    try:
        paths = generate_credentials(
            args.out_dir,
            hosts=args.hosts or list(_DEFAULT_HOSTS),
            num_supernodes=args.supernodes,
            force=args.force,
            valid_days=args.valid_days,
        )
    except (FileExistsError, ValueError) as err:  # ValueError: a bad --host or --supernodes
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in paths.all_files:
        print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
