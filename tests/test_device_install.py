"""Issue 18, item 4: the device install profile.

``pip install feddistill`` (``[project] dependencies``) is what a device installs: the ClientApp
must load and answer plain, signed, DP-SGD and SecAgg+ rounds with none of the packages the
profile leaves out (``feddistill.profiles.DEVICE_EXCLUDED``: the simulation engine, plotting,
audit and test tools) importable, must not import them where they are installed, and the
profile's package list must not grow to include them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from feddistill.profiles import DEVICE_EXCLUDED, DEVICE_EXTRAS

pytestmark = pytest.mark.e2e(seconds=15)

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Run first in a fresh interpreter: every package the device profile leaves out is not found,
# exactly as if it were not installed (the path finder answers None for it: find_spec gives None,
# import raises ModuleNotFoundError); `tried` records the names asked for.
BLOCKER = """
import importlib.abc, importlib.machinery, sys
from feddistill.profiles import DEVICE_EXCLUDED
tried = []
class NotInstalled(importlib.abc.MetaPathFinder):
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in DEVICE_EXCLUDED:
            tried.append(name)
            return None
        return self.inner.find_spec(name, path, target)
    def invalidate_caches(self):
        self.inner.invalidate_caches()
finders = sys.meta_path
sys.meta_path = [NotInstalled(f) if f is importlib.machinery.PathFinder else f for f in finders]
assert any(isinstance(f, NotInstalled) for f in sys.meta_path), finders
"""

# What a SuperNode loads to run the app: its own entry points, then the ClientApp named in
# pyproject.toml [tool.flwr.app.components], through Flower's own loader.
LOAD_CLIENTAPP = """
import flwr.supernode.cli.flower_supernode, flwr.supernode.cli.flwr_clientapp
from flwr.clientapp import ClientApp
from flwr.supercore.object_ref import load_app
app = load_app("feddistill.client.app:app", RuntimeError)
assert isinstance(app, ClientApp), type(app)
"""


def _python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _name(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503), without extras or version."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()


def test_the_device_profile_lists_none_of_the_excluded_packages():
    device = [_name(r) for r in PYPROJECT["dependencies"]]
    excluded = {_name(dist) for dist, _ in DEVICE_EXCLUDED.values()}
    assert not excluded & set(device), f"device dependencies include {sorted(excluded & set(device))}"
    # flwr without its [simulation] extra: that extra is Ray
    assert [r for r in PYPROJECT["dependencies"] if _name(r) == "flwr"] == ["flwr==1.41.0"]
    assert {"torch==2.13.0", "opacus==1.6.0", "dp-accounting==0.6.0"} <= set(PYPROJECT["dependencies"])


def test_every_excluded_package_comes_back_with_its_extra():
    """What the device leaves out, the full install (`.[full]`, and `.[test]` for CI) still has."""
    extras = PYPROJECT["optional-dependencies"]
    assert set(DEVICE_EXTRAS) <= set(extras)
    declared = {extra: {_name(r) for r in reqs} for extra, reqs in extras.items()}
    for module, (dist, extra) in DEVICE_EXCLUDED.items():
        if extra and module not in ("ray", "PIL"):  # ray: through flwr[simulation]; pillow: matplotlib's
            assert _name(dist) in declared[extra], f"{dist} (import {module}) missing from the {extra!r} extra"
    assert "flwr[simulation]==1.41.0" in extras["simulation"]
    assert extras["full"] == ["feddistill[simulation,plots]"]
    assert "feddistill[full]" in extras["test"]


def test_the_clientapp_answers_every_kind_of_round_without_the_excluded_packages():
    code = (
        BLOCKER
        + LOAD_CLIENTAPP
        + """
import json
from feddistill.deploy.device_check import check_device
result = check_device()
try:
    import matplotlib
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({"result": result, "tried": tried, "blocked": blocked}))
"""
    )
    run = _python(code)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["blocked"], "the blocker let matplotlib through: this test would prove nothing"
    rounds = out["result"]["rounds"]
    assert set(rounds) == {"plain", "signed", "dp-sgd", "secagg+"}
    failed = {kind: r.get("error") for kind, r in rounds.items() if not r["ok"]}
    assert not failed, f"rounds failed on a device install: {failed}"
    assert rounds["dp-sgd"]["metrics"]["record-epsilon"] > 0  # Opacus trained and the ledger charged it
    assert out["result"]["heavy_imported"] == [] and out["result"]["ok"]


def test_the_client_path_imports_none_of_them_where_they_are_installed():
    """The full environment has them all: the ClientApp, its DP-SGD, ledger, SecAgg+ and
    signed-download modules still leave them alone (a device's cold start pays for none)."""
    code = (
        LOAD_CLIENTAPP
        + """
import json, sys
import feddistill.client.secagg, feddistill.privacy.dpsgd, feddistill.privacy.ledger
import feddistill.deploy.download_signing, feddistill.deploy.device_check
from feddistill.profiles import DEVICE_EXCLUDED
print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in DEVICE_EXCLUDED)))
"""
    )
    run = _python(code)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []


def test_a_device_install_names_what_feddistill_simulate_lacks():
    code = BLOCKER + "import sys\nfrom feddistill.cli import main\nsys.argv = ['feddistill', 'simulate']\nmain()\n"
    run = _python(code, timeout=120)
    assert run.returncode == 2, run.stderr[-3000:]
    message = " ".join(run.stderr.split())
    assert "feddistill simulate needs the full install" in message and "ray, scikit-learn, kornia" in message
    assert "pip install 'feddistill[full]'" in message


def test_the_messages_that_train_nothing_import_no_torch():
    """A deployed SuperNode starts a ClientApp process per message. An identify query and the
    SecAgg+ stages that train nothing (here: setup, with the device's check of the server's
    parameters) are answered without importing torch, the models or the training code: those
    processes start in about half the time of one that trains."""
    code = (
        LOAD_CLIENTAPP
        + """
import json, sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from feddistill import protocol
from feddistill.config import load_config
from feddistill.privacy.distributed import run_secagg_noise
from flwr.supercore.task_identity import TaskIdentity

TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 7
cfg = load_config(None, {"fleet.num_clients": 3, "distill.secure_aggregation": "secagg+",
                         "distill.secagg_num_shares": 3, "distill.secagg_reconstruction_threshold": 2,
                         "privacy.client_level": "central", "privacy.noise_multiplier": 1.0})
context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 3},
                  state=RecordDict(), run_config=cfg.to_flat())
identify = app(Message(RecordDict(), dst_node_id=7, message_type=protocol.IDENTIFY), context)
noise = run_secagg_noise(cfg)
setup = ConfigRecord({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
                      Key.CLIPPING_RANGE: noise.clipping_range, Key.TARGET_RANGE: noise.quantization_range,
                      Key.MOD_RANGE: 1 << 30, Key.MAX_WEIGHT: 1.0})
keys = app(Message(RecordDict({RECORD_KEY_CONFIGS: setup}), dst_node_id=7, message_type="train"), context)
print(json.dumps({
    "partition": identify.content.config_records[protocol.REPLY_META][protocol.PARTITION],
    "public_keys": sorted(keys.content.config_records[RECORD_KEY_CONFIGS]),
    "error": keys.error.reason if keys.has_error() else None,
    "heavy": sorted(m for m in ("torch", "opacus", "feddistill.client.distill", "feddistill.models")
                    if m in sys.modules),
}))
"""
    )
    run = _python(code)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["partition"] == 1 and out["error"] is None
    assert out["public_keys"] == ["pk1", "pk2"]  # SecAgg+'s setup answered: the node's two public keys
    assert out["heavy"] == []
