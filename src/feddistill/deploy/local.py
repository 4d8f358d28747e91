"""A whole secure deployment on one machine, with real Flower processes.

:func:`deploy_local` walks the path an operator walks on real hardware, on 127.0.0.1:

1. credentials: CA, SuperLink TLS certificate, one EC key pair per SuperNode
   (:func:`feddistill.deploy.certs.generate_credentials`);
2. device data: the configured data set's private pool is split as the simulated fleet
   would split it, and each device gets ``private.npz`` + the public ``reference.npz`` in its
   own data dir (:func:`feddistill.client.device.write_device_data`);
3. ``flower-superlink`` over TLS with ``--enable-supernode-auth`` and a ``--database`` file;
4. ``flwr supernode register <supernode-i.pub> <connection>`` for every SuperNode key;
5. ``flower-supernode`` per device: its own private key, ``--root-certificates ca.crt``,
   ``--node-config 'partition-id=i num-partitions=N data-dir="..." release-public-key="..."'``
   (the pinned release-signing key), its own ``--port``;
6. ``flwr run <app-dir> <connection> --stream --run-config run-config.toml`` (downloads signed
   with ``certs/release-signing.key``, device noise from OS entropy); then the
   ServerApp's ``results.json`` is read back and every process is stopped (SIGTERM, then
   SIGKILL, by process group: each process is started in its own session, so the SuperExec
   and app processes Flower starts under it go with it).

Nothing runs with ``--insecure``; every download is signed and every SuperNode pins the key
(unless ``sign=False`` / ``--no-sign``). Every process writes to ``<out>/logs/<name>.log``.

Faults, for the restart soak (``bench/soak.py``): :meth:`LocalDeployment.kill_supernode` /
:meth:`~LocalDeployment.restart_supernode` (``kill -9``, then the same key, data dir and state),
:meth:`~LocalDeployment.restart_superlink` (same port, same ``--database``),
:meth:`~LocalDeployment.stop_run` (``flwr stop``) and ``launch(..., resume=True)`` (a new
``flwr run`` that continues the run in its output dir from its checkpoint).
The privacy officer's audit (``feddistill audit-deployment``) can be tried too: ``--audit-nodes N``
makes the last N SuperNodes audit nodes (node config ``audit-canary-secret``, the secret made in
``<out>/officer/canary.secret`` unless ``--audit-secret``), and ``--canary-records M`` has every
device hold M canary records (node config ``canary-records``).
``--secure-aggregation secagg+`` (``distill.secure-aggregation``) collects the answers through
Flower's SecAgg+ over the same TLS connections: the FitIns of SecAgg+'s masking stage carries
the signed download, which every device verifies before it answers; under ``central`` or
``gnmax`` DP each device adds its noise share from OS entropy (``feddistill.client.secagg``).

CLI: ``python -m feddistill.deploy.local OUT [--supernodes N] [--rounds R]
[--config FILE.toml] [--set KEY=VALUE ...] [--secure-aggregation off|secagg+] [--timeout S]
[--app-dir DIR] [--no-sign]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from feddistill.atomic import atomic_path
from feddistill.client.canary import CANARIES_KEY, DEFAULT_CANARIES, SECRET_KEY
from feddistill.client.record_canaries import RECORDS_KEY
from feddistill.deploy.certs import RELEASE_SIGNING_KEY, CredentialPaths, generate_credentials

__all__ = ["AuditNodes", "CONNECTION", "LocalDeployment", "DeploymentError", "deploy_local", "find_app_dir", "main"]

CONNECTION = "feddistill-local"  # name of the SuperLink connection in $FLWR_HOME/config.toml
_VENV_BIN = Path(sys.executable).parent


class DeploymentError(RuntimeError):
    """A step of the local deployment failed; the message names the step and its log."""


def find_app_dir(start: Path | None = None) -> Path:
    """The Flower app dir: the first parent of this package (or of `start`) whose
    pyproject.toml declares ``[tool.flwr.app]``."""
    here = Path(start or __file__).resolve()
    for parent in [here, *here.parents]:
        pyproject = parent / "pyproject.toml"
        if pyproject.is_file():
            try:
                data = tomllib.loads(pyproject.read_text())
            except tomllib.TOMLDecodeError:
                continue
            if "app" in data.get("tool", {}).get("flwr", {}):
                return parent
    raise DeploymentError(f"no pyproject.toml with [tool.flwr.app] above {here}: pass app_dir")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    raise DeploymentError(f"run-config value {value!r} must be a bool, number or string")


def _toml_string_path(path: Path) -> str:
    text = str(path)
    if '"' in text or "\\" in text or "\n" in text:
        raise DeploymentError(f"{text!r}: a path used in Flower configs may not contain quotes or backslashes")
    return f'"{text}"'


class _Proc:
    def __init__(self, name: str, popen: subprocess.Popen, log: Path) -> None:
        self.name, self.popen, self.log = name, popen, log

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def run_id_of(proc: _Proc) -> int | None:
    """The run id `flwr run` printed in its log (None: not yet, or it failed); the last one, as a
    log is appended to when the same command runs again (a resumed run)."""
    found = re.findall(r"Successfully started run (\d+)", proc.tail(1_000_000))
    return int(found[-1]) if found else None


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group of a process we started with start_new_session=True
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in Path("/proc").iterdir() if e.name.isdigit()]
    except OSError:
        return set()
    for entry in entries:
        try:  # "pid (comm) state ppid ...": comm may hold spaces and parentheses
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _signal_pids(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_processes(procs: Sequence[subprocess.Popen], grace_s: float = 10.0) -> list[int | None]:
    """SIGTERM each process's group (each was started in its own session), wait up to
    `grace_s`, then SIGKILL the groups: the leader may be gone while Flower's children
    (SuperExec, ServerApp/ClientApp processes) are not. Descendants that left the group
    (the SuperLink starts its SuperExec in a session of its own, and that one outlived the
    SuperLink by a second or two) are found before the first signal and stopped by pid too;
    returns once they are gone (or after another `grace_s`). Returns the exit codes."""
    strays = set().union(*(_descendants(proc.pid) for proc in procs if proc.poll() is None))
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    _signal_pids(strays, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    codes: list[int | None] = []
    for proc in procs:
        _signal_group(proc, signal.SIGKILL)
        try:
            codes.append(proc.wait(timeout=grace_s))
        except subprocess.TimeoutExpired:
            codes.append(None)
    deadline = time.monotonic() + grace_s
    while any(_alive(pid) for pid in strays) and time.monotonic() < deadline:
        _signal_pids({pid for pid in strays if _alive(pid)}, signal.SIGKILL)
        time.sleep(0.1)
    return codes


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> int | None:
    """:func:`stop_processes` for one process."""
    return stop_processes([proc], grace_s)[0]


def kill_process_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> int | None:
    """``kill -9`` a process, its group and every descendant at once, with no SIGTERM first: a
    crash, as when a device loses power (nothing gets to save or say goodbye). Returns the exit code."""
    strays = _descendants(proc.pid) if proc.poll() is None else set()
    _signal_group(proc, signal.SIGKILL)
    _signal_pids(strays, signal.SIGKILL)
    try:
        code: int | None = proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        code = None
    deadline = time.monotonic() + grace_s
    while any(_alive(pid) for pid in strays) and time.monotonic() < deadline:
        time.sleep(0.05)
    return code


@dataclass(frozen=True)
class AuditNodes:
    """The privacy officer's audit SuperNodes in a local deployment: how many (the last ones),
    the officer's secret file (None: one is made under OUT/officer) and canaries per node."""

    count: int = 0
    secret: Path | None = None
    canaries: int = DEFAULT_CANARIES
    record_canaries: int = 0  # canary records each device holds (node config canary-records), 0: none

    def node_config(self, secret: Path) -> str:
        return f" {SECRET_KEY}={_toml_string_path(secret.resolve())} {CANARIES_KEY}={self.canaries}"


class LocalDeployment:
    """SuperLink + SuperNodes on 127.0.0.1 with TLS and SuperNode authentication.

    Use as a context manager: every process it started is stopped on exit.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        num_supernodes: int = 3,
        app_dir: str | Path | None = None,
        config: Mapping[str, Any] | None = None,
        startup_timeout_s: float = 60.0,
        sign: bool = True,
        supernode_bin: str | Path | None = None,
        audit: AuditNodes | None = None,
    ) -> None:
        """``supernode_bin``: the ``bin`` folder of the environment the SuperNodes (and the ClientApp
        processes they start) run in, e.g. a device install's venv; default: this one's."""
        from feddistill.config import flat_run_config, parse_config

        if num_supernodes < 1:
            raise ValueError("num_supernodes must be >= 1")
        self.audit = audit or AuditNodes()
        if self.audit.count >= num_supernodes:
            raise ValueError(f"{self.audit.count} audit SuperNodes leave no device among {num_supernodes} SuperNodes")
        self.out = Path(out_dir).expanduser().resolve()
        self.num_supernodes = num_supernodes
        self.app_dir = Path(app_dir).resolve() if app_dir is not None else find_app_dir()
        self.startup_timeout_s = startup_timeout_s
        self.supernode_bin = Path(supernode_bin) if supernode_bin is not None else _VENV_BIN
        self.sign = sign
        # the run config as Flower will see it (overrides only; the app's pyproject has the rest).
        # Devices draw their noise from OS entropy (they refuse seeded noise: the server knows the seed).
        user = flat_run_config(config or {})
        self.run_config = {"privacy.noise-source": "os-entropy", **user, "fleet.num-clients": num_supernodes}
        if sign:
            mine = [k for k in user if k.startswith("security.")]
            if mine:
                raise DeploymentError(
                    f"{', '.join(mine)}: deploy-local signs every download with its own key "
                    f"({self.out / 'certs' / RELEASE_SIGNING_KEY}) and pins it on every "
                    "SuperNode; drop these keys, or turn signing off (--no-sign)"
                )
            self.run_config["security.signing-key"] = str(self.out / "certs" / RELEASE_SIGNING_KEY)
        self._app_keys = set(
            tomllib.loads((self.app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"].get("config", {})
        )
        self.cfg = parse_config(self.run_config, "deploy-local config")  # fail early, before any process
        self.logs = self.out / "logs"
        self.flwr_home = self.out / "flwr-home"
        self.creds: CredentialPaths | None = None
        self.port: int | None = None
        self.superlink: _Proc | None = None
        self.supernodes: dict[int, _Proc] = {}
        self.node_ids: dict[int, int] = {}
        self._others: list[_Proc] = []

    # ---- paths
    @property
    def audit_node_ids(self) -> list[int]:
        """The audit SuperNodes: the last ``audit.count`` of them (their partition-id is their index)."""
        return list(range(self.num_supernodes - self.audit.count, self.num_supernodes))

    @property
    def officer_secret(self) -> Path:
        """The officer's canary secret: the one given, or ``OUT/officer/canary.secret`` made by :meth:`prepare`."""
        return self.audit.secret or self.out / "officer" / "canary.secret"

    def device_dir(self, i: int) -> Path:
        return self.out / "devices" / f"device-{i}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, flwr_home: Path | None = None, bin_dir: Path = _VENV_BIN) -> dict[str, str]:
        env = dict(os.environ)
        if bin_dir != _VENV_BIN:  # another environment (a device install) imports its own feddistill
            env.pop("PYTHONPATH", None)
        env.update(
            PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",  # Flower starts flower-superexec from PATH
            FLWR_HOME=str(flwr_home or self.flwr_home),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], append: bool = True) -> _Proc:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with open(log, "ab" if append else "wb") as fh:
            fh.write(f"$ {' '.join(cmd)}\n".encode())
            fh.flush()
            popen = subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.out,
                env=env,
                start_new_session=True,
            )
        return _Proc(name, popen, log)

    def _run_all(self, jobs: Mapping[str, list[str]], timeout_s: float) -> dict[str, subprocess.CompletedProcess]:
        """Run short commands concurrently; their output is in their logs."""
        procs = {name: self._spawn(name, cmd, self.env(), append=False) for name, cmd in jobs.items()}
        self._others.extend(procs.values())
        deadline = time.monotonic() + timeout_s
        try:
            done = {}
            for name, proc in procs.items():
                try:
                    rc = proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise DeploymentError(
                        f"`{' '.join(jobs[name][:3])} ...` did not finish in {timeout_s:.0f} s; see {proc.log}"
                    ) from None
                done[name] = subprocess.CompletedProcess(jobs[name], rc, proc.tail(20_000), "")
            return done
        finally:
            stop_processes([p.popen for p in procs.values()], grace_s=5.0)
            for proc in procs.values():
                self._others.remove(proc)

    # ---- steps
    def prepare(self) -> None:
        """Credentials, device data dirs and the flwr connection config."""
        from feddistill.client.device import write_device_data
        from feddistill.data.fleet import load_fleet

        self.out.mkdir(parents=True, exist_ok=True)
        certs_dir = self.out / "certs"
        if (certs_dir / "ca.crt").is_file():  # a second run in the same folder keeps its identities
            from feddistill.deploy.certs import _layout

            self.creds = _layout(certs_dir, self.num_supernodes, ("localhost", "127.0.0.1"))
            missing = [p for p in self.creds.all_files if not p.is_file()]
            if missing:
                raise DeploymentError(f"{missing[0]}: missing; remove {certs_dir} to regenerate all credentials")
        else:
            self.creds = generate_credentials(certs_dir, num_supernodes=self.num_supernodes)
        if self.audit.count and not self.officer_secret.is_file():  # on real hardware the officer makes it
            self.officer_secret.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.officer_secret) as tmp:
                tmp.write_text(secrets.token_hex(32) + "\n")
                tmp.chmod(0o600)
        fleet = load_fleet(self.cfg.data, self.cfg.fleet, self.cfg.seed)
        for i in range(self.num_supernodes):
            write_device_data(self.device_dir(i), fleet.private_data(i), fleet.splits.reference)
        self.flwr_home.mkdir(parents=True, exist_ok=True)

    def _write_connection(self) -> None:
        assert self.creds is not None
        (self.flwr_home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "{self.address}"\n'
            f"root-certificates = {_toml_string_path(self.creds.ca_cert.resolve())}\n"
        )

    def start_superlink(self) -> None:
        assert self.creds is not None
        if self.port is None:  # a restart keeps the address the SuperNodes and `flwr` know
            self.port = free_port()
        self._write_connection()
        (self.out / "superlink").mkdir(exist_ok=True)
        cmd = [
            str(_VENV_BIN / "flower-superlink"),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            *self.creds.superlink_tls_args(),
            "--enable-supernode-auth",
            "--database", str(self.out / "superlink" / "state.db"),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        self.superlink = self._spawn("superlink", cmd, self.env())
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        import http.client

        assert self.creds is not None and self.superlink is not None
        ctx = ssl.create_default_context(cafile=str(self.creds.ca_cert))
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.superlink.popen.poll() is not None:
                raise DeploymentError(
                    f"flower-superlink exited ({self.superlink.popen.returncode}):\n{self.superlink.tail()}"
                )
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=ctx, timeout=3)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            time.sleep(0.3)
        raise DeploymentError(
            f"flower-superlink not healthy after {self.startup_timeout_s:.0f} s; see {self.superlink.log}"
        )

    def register(self, indices: Sequence[int] | None = None) -> dict[int, int]:
        """``flwr supernode register <supernode-i.pub> <connection>`` for each SuperNode (all by
        default, concurrently); returns their node ids."""
        assert self.creds is not None
        indices = range(self.num_supernodes) if indices is None else indices
        jobs = {
            f"register-{i}": [
                str(_VENV_BIN / "flwr"),
                "supernode",
                "register",
                str(self.creds.supernode_public_keys[i]),
                CONNECTION,
                "--format",
                "json",
            ]
            for i in indices
        }
        done = self._run_all(jobs, timeout_s=self.startup_timeout_s)
        for i in indices:
            out = done[f"register-{i}"].stdout
            try:
                result = json.loads(out[out.index("{", out.index("\n") + 1) :])  # skip the echoed command line
            except ValueError:
                result = {}
            if done[f"register-{i}"].returncode != 0 or not result.get("success"):
                raise DeploymentError(
                    f"registering {self.creds.supernode_public_keys[i]} failed (exit "
                    f"{done[f'register-{i}'].returncode}); see {self.logs / f'register-{i}.log'}:\n"
                    f"{out[-2000:]}"
                )
            self.node_ids[i] = int(result["node-id"])
        return {i: self.node_ids[i] for i in indices}

    def start_supernode(self, i: int, private_key: Path | None = None, name: str | None = None) -> _Proc:
        assert self.creds is not None
        home = self.out / "nodes" / f"node-{i}"
        home.mkdir(parents=True, exist_ok=True)
        node_config = (
            f"partition-id={i} num-partitions={self.num_supernodes} data-dir={_toml_string_path(self.device_dir(i))}"
        )
        if self.sign:  # the device accepts only downloads signed by the deployment's key
            node_config += f" release-public-key={_toml_string_path(self.creds.release_signing_pub.resolve())}"
        if i in self.audit_node_ids:  # the officer's audit SuperNode: canary answers (feddistill.client.canary)
            node_config += self.audit.node_config(self.officer_secret)
        elif self.audit.record_canaries:  # a device holding canary records (feddistill.client.record_canaries)
            node_config += f" {RECORDS_KEY}={self.audit.record_canaries}"
        cmd = [
            str(self.supernode_bin / "flower-supernode"),
            "--superlink", self.address,
            "--root-certificates", str(self.creds.ca_cert),
            "--auth-supernode-private-key", str(private_key or self.creds.supernode_private_keys[i]),
            "--node-config", node_config,
            "--port", str(free_port()),
        ]  # fmt: skip
        proc = self._spawn(name or f"supernode-{i}", cmd, self.env(home, self.supernode_bin))
        if name is None:
            self.supernodes[i] = proc
        else:
            self._others.append(proc)
        return proc

    def stop_supernode(self, i: int) -> int | None:
        proc = self.supernodes.pop(i)
        return stop_process(proc.popen)

    # ---- faults: what a crash looks like (the soak, bench/soak.py, uses these)
    def kill_supernode(self, i: int) -> int | None:
        """``kill -9`` SuperNode `i` with the ClientApp processes it started (mid-round, its
        reply is lost); :meth:`restart_supernode` brings it back."""
        return kill_process_tree(self.supernodes.pop(i).popen)

    def restart_supernode(self, i: int, timeout_s: float = 240.0, retry_s: float = 5.0) -> int:
        """Start SuperNode `i` again with the same key (so the same node id), data dir (its
        state and ledger) and node home (its log is appended to), as a supervisor would
        (systemd's ``Restart=on-failure``): Flower 1.41's SuperLink refuses to activate a node
        it still counts online (until 2 missed heartbeats, about a minute after a ``kill -9``),
        so an attempt that exits is retried every `retry_s` seconds. Returns the attempts made."""
        if i in self.supernodes:
            raise DeploymentError(f"supernode-{i} is running: kill or stop it first")
        deadline = time.monotonic() + timeout_s
        attempts = 0
        while time.monotonic() < deadline:
            attempts += 1
            if self._start_and_activate(i, deadline):
                return attempts
            time.sleep(retry_s)
        raise DeploymentError(f"supernode-{i} did not come back within {timeout_s:.0f} s; see {self.logs}")

    def _start_and_activate(self, i: int, deadline: float) -> bool:
        """Start SuperNode `i` and wait until the SuperLink activated it (True) or it exited (False:
        whatever it started is killed, so a failed attempt leaves no stray SuperExec behind)."""
        log = self.logs / f"supernode-{i}.log"
        offset = log.stat().st_size if log.is_file() else 0
        proc = self.start_supernode(i, name=f"supernode-{i}")  # one of `_others` until it is up
        started: set[int] = set()
        while time.monotonic() < deadline:
            started |= _descendants(proc.popen.pid)
            with open(log, "rb") as fh:
                fh.seek(offset)
                if b"SuperNode ID:" in fh.read():
                    self._others.remove(proc)
                    self.supernodes[i] = proc
                    return True
            if proc.popen.poll() is not None:
                break
            time.sleep(0.2)
        self._others.remove(proc)
        kill_process_tree(proc.popen)
        _signal_pids({pid for pid in started if _alive(pid)}, signal.SIGKILL)
        return False

    def restart_superlink(self, *, kill: bool = True) -> None:
        """Stop the SuperLink (``kill -9`` by default, else SIGTERM) with the SuperExec and
        ServerApp under it, and start it again on the same port with the same ``--database``
        (registrations and runs survive in it)."""
        assert self.superlink is not None, "the SuperLink is not running"
        old, self.superlink = self.superlink, None
        if kill:
            kill_process_tree(old.popen)
        else:
            stop_process(old.popen)
        self.start_superlink()

    def stop_run(self, run_id: int) -> bool:
        """``flwr stop <run_id>``: mark a run whose ServerApp died (e.g. with the SuperLink) as
        stopped, so that no SuperNode works for it any more. Whether the SuperLink accepted it."""
        name = f"stop-run-{run_id}"
        done = self._run_all({name: [str(_VENV_BIN / "flwr"), "stop", str(run_id), CONNECTION]}, self.startup_timeout_s)
        return done[name].returncode == 0

    def start(self, *, register: bool = True) -> LocalDeployment:
        """Prepare, start the SuperLink, register every key (skip it when the SuperLink's
        database already holds them) and start every SuperNode."""
        self.prepare()
        self.start_superlink()
        if register:
            self.register()
        for i in range(self.num_supernodes):
            self.start_supernode(i)
        return self

    def run(
        self,
        *,
        rounds: int,
        output_dir: str | Path,
        overrides: Mapping[str, Any] | None = None,
        timeout_s: float = 600.0,
    ) -> dict[str, Any]:
        """``flwr run`` the app on this deployment; returns the ServerApp's results.json."""
        proc = self.launch(rounds=rounds, output_dir=output_dir, overrides=overrides)
        return self.wait_results(proc, output_dir, timeout_s)

    def launch(
        self,
        *,
        rounds: int,
        output_dir: str | Path,
        overrides: Mapping[str, Any] | None = None,
        resume: bool = False,
    ) -> _Proc:
        """Start ``flwr run --stream`` of the app on this deployment (not waiting for it); with
        `resume`, a new Flower run that continues the interrupted run in `output_dir` from its
        checkpoint (run config ``resume = true``; the rest of the run config must be the same)."""
        from feddistill.config import flat_run_config, parse_config

        output_dir = Path(output_dir).expanduser().resolve()
        run_config = {
            **self.run_config,
            **flat_run_config(overrides or {}),
            "rounds": rounds,
            "output-dir": str(output_dir),
            "resume": resume,
        }
        parse_config(run_config, "deploy-local config")
        unknown = sorted(set(run_config) - self._app_keys)
        if unknown:
            raise DeploymentError(
                f"run-config keys {unknown} are not in [tool.flwr.app.config] of "
                f"{self.app_dir / 'pyproject.toml'}: Flower would reject them"
            )
        from feddistill.runfolder import RunFolderError, prepare_run_folder

        try:  # the ServerApp would refuse it too, but only after Flower has started the run
            prepare_run_folder(output_dir, resume=resume, ways_out="use a fresh output dir for every run")
        except RunFolderError as exc:
            raise DeploymentError(str(exc)) from None
        name = f"{output_dir.name}-resume" if resume else output_dir.name
        config_file = self.out / f"run-config-{name}.toml"
        config_file.write_text("".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in sorted(run_config.items())))
        cmd = [
            str(_VENV_BIN / "flwr"),
            "run",
            str(self.app_dir),
            CONNECTION,
            "--stream",
            "--run-config",
            str(config_file),
        ]
        proc = self._spawn(f"flwr-run-{name}", cmd, self.env())
        self._others.append(proc)
        self.last_run = {"run_id": None, "log": str(proc.log), "run_config": str(config_file)}
        return proc

    def wait_results(self, proc: _Proc, output_dir: str | Path, timeout_s: float = 600.0) -> dict[str, Any]:
        """Wait for the run `proc` (from :meth:`launch`) to write results.json; stop `proc`."""
        from feddistill.runfolder import RunFolder

        results_path = RunFolder(Path(output_dir).expanduser().resolve()).results
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if results_path.is_file():
                    break
                if proc.popen.poll() is not None:  # the stream ends when the run ends
                    time.sleep(1.0)
                    if results_path.is_file():
                        break
                    raise DeploymentError(
                        f"the run ended without {results_path} (flwr run exit "
                        f"{proc.popen.returncode}); see {proc.log}:\n{proc.tail()}"
                    )
                self._check_alive()
                time.sleep(0.5)
            else:
                raise DeploymentError(f"no {results_path} after {timeout_s:.0f} s; see {self.logs}")
            results = json.loads(results_path.read_text())
            try:  # let the stream finish so the log is complete
                proc.popen.wait(timeout=max(1.0, min(30.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
        finally:
            stop_process(proc.popen, grace_s=5.0)
            if proc in self._others:
                self._others.remove(proc)
        self.last_run["run_id"] = run_id_of(proc)
        return results

    def _check_alive(self) -> None:
        for proc in [self.superlink, *self.supernodes.values()]:
            if proc is not None and proc.popen.poll() is not None:
                raise DeploymentError(f"{proc.name} exited ({proc.popen.returncode}); see {proc.log}:\n{proc.tail()}")

    def stop(self) -> dict[str, int | None]:
        """Stop every process this deployment started (SuperNodes first)."""
        procs = [*self._others, *self.supernodes.values()]
        codes = dict(zip([p.name for p in procs], stop_processes([p.popen for p in procs])))
        self._others.clear()
        self.supernodes.clear()
        if self.superlink is not None:
            codes["superlink"] = stop_process(self.superlink.popen)
            self.superlink = None
        return codes

    def log_paths(self) -> dict[str, str]:
        return {p.stem: str(p) for p in sorted(self.logs.glob("*.log"))}

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def deploy_local(
    out_dir: str | Path,
    *,
    num_supernodes: int = 3,
    rounds: int = 2,
    config_overrides: Mapping[str, Any] | None = None,
    timeout_s: float = 600.0,
    app_dir: str | Path | None = None,
    sign: bool = True,
    audit: AuditNodes | None = None,
    secure_aggregation: str | None = None,
) -> dict[str, Any]:
    """Deploy on 127.0.0.1 with TLS + SuperNode auth (+ signed downloads and pinned key unless
    ``sign=False``), run `rounds` rounds, stop everything. ``secure_aggregation`` ("off" or
    "secagg+") sets ``distill.secure-aggregation`` for the run (None: the config's).

    Returns ``{"results": results.json, "out_dir", "results_path", "node_ids", "run_id",
    "logs": {name: path}, "certs", "device_dirs", "signed", "seconds"}``. Raises
    :class:`DeploymentError` (naming the failing step and its log) on failure.
    """
    from feddistill.runfolder import RunFolder

    t0 = time.monotonic()
    deadline = t0 + timeout_s
    config = dict(config_overrides or {})
    if secure_aggregation is not None:
        config["distill.secure-aggregation"] = secure_aggregation
    deployment = LocalDeployment(
        out_dir, num_supernodes=num_supernodes, app_dir=app_dir, config=config, sign=sign, audit=audit
    )
    with deployment:
        deployment.start()
        results = deployment.run(
            rounds=rounds, output_dir=deployment.out / "run", timeout_s=max(1.0, deadline - time.monotonic())
        )
    assert deployment.creds is not None
    return {
        "results": results,
        "out_dir": str(deployment.out),
        "results_path": str(RunFolder(deployment.out / "run").results),
        "node_ids": deployment.node_ids,
        "run_id": deployment.last_run["run_id"],
        "logs": deployment.log_paths(),
        "certs": str(deployment.creds.out_dir),
        "device_dirs": [str(deployment.device_dir(i)) for i in range(num_supernodes)],
        "signed": sign,
        "audit_nodes": deployment.audit_node_ids,
        "officer_secret": str(deployment.officer_secret) if deployment.audit.count else None,
        "seconds": time.monotonic() - t0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: a secure local deployment (TLS + SuperNode auth) of N SuperNodes, one run."""
    parser = argparse.ArgumentParser(prog="feddistill deploy-local", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", type=Path, default=None, help="TOML run config (feddistill simulate format)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="Override a run-config key, e.g. --set teacher.epochs=20",
    )
    parser.add_argument(
        "--secure-aggregation",
        choices=("off", "secagg+"),
        default=None,
        help="Collect the answers through Flower's SecAgg+ (distill.secure-aggregation; default: the config's)",
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--audit-nodes", type=int, default=0, help="The last N SuperNodes are the officer's audit nodes (canaries)"
    )
    parser.add_argument("--audit-secret", type=Path, default=None, help="The officer's canary secret (default: made)")
    parser.add_argument("--audit-canaries", type=int, default=DEFAULT_CANARIES, help="Canaries per audit node")
    parser.add_argument("--canary-records", type=int, default=0, help="Canary records per device (record-level audit)")
    parser.add_argument("--app-dir", type=Path, default=None)
    parser.add_argument(
        "--no-sign",
        dest="sign",
        action="store_false",
        help="Send unsigned downloads and pin no key on the SuperNodes (signed and pinned by default)",
    )
    args = parser.parse_args(argv)
    from feddistill.config import ConfigError, flat_run_config, parse_override, read_toml

    overrides: dict[str, Any] = {}
    try:
        if args.config is not None:
            overrides.update(flat_run_config(read_toml(args.config, "config file")))
        overrides.update(flat_run_config(dict(parse_override(s) for s in args.overrides)))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    overrides.pop("output-dir", None)
    try:
        info = deploy_local(
            args.out_dir,
            num_supernodes=args.supernodes,
            rounds=args.rounds,
            config_overrides=overrides,
            timeout_s=args.timeout,
            app_dir=args.app_dir,
            sign=args.sign,
            audit=AuditNodes(args.audit_nodes, args.audit_secret, args.audit_canaries, args.canary_records),
            secure_aggregation=args.secure_aggregation,
        )
    except (DeploymentError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for r in info["results"]["rounds"]:
        print(
            f"round {r['round']}: {r['replies']}/{r['clients']} replies, student accuracy {r['student_accuracy']:.3f}"
        )
    if info["signed"]:
        print(
            f"downloads signed with {Path(info['certs']) / RELEASE_SIGNING_KEY}; every SuperNode pinned its public key"
        )
    if args.canary_records:
        for i, device in enumerate(info["device_dirs"]):
            if i not in info["audit_nodes"]:
                print(f"device {i}: feddistill device-canaries {device} --out {device}-canaries.npz")
    if info["officer_secret"]:
        nodes = " ".join(f"--audit-node {i}" for i in info["audit_nodes"])
        print(
            f"audit nodes {info['audit_nodes']}: feddistill audit-deployment {Path(info['results_path']).parent} "
            f"--secret {info['officer_secret']} {nodes} --canaries {args.audit_canaries}"
        )
    print(f"results: {info['results_path']}  logs: {Path(info['out_dir']) / 'logs'}  ({info['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
