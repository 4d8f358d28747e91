"""Benchmarks: `python -m bench SUITE [--out DIR]`. Each writes JSON (config, environment,
figures) and PNG plots under bench/results/SUITE/. Not part of the test run.

Suites:
  core     Fashion-MNIST, 100 clients, Dirichlet 0.5: feddistill vs Flower FedAvg on the same
           fleet and rounds, local-only, centralized, public teacher; accuracy and upload bytes.
  privacy  the same fleet: accuracy vs epsilon for record-level DP (DP-SGD on devices) and
           client-level DP (GNMax votes), and Flower's DP-FedAvg at the same client-level epsilon.
  faults   the same fleet with 20 % hostile clients (each attack) under a robust aggregator and
           under the plain mean, and with 30 % dropouts per round.
  audit    `feddistill audit` on digits runs (non-private, record-level eps 8 and 2, client-level
           GNMax eps 4): AUC, TPR at 1 % and 0.1 % FPR, empirical eps vs claimed eps per target;
           and the audit's time on the digits quick start and on a Fashion-MNIST run.
  deploy   3 SuperNodes on loopback (TLS, node auth) vs the simulation engine on the same digits
           run: seconds per round; the client footprint (install size, ClientApp import time,
           peak RSS of a SuperNode with the ClientApp processes it starts).
  install  the device install profile (`pip install feddistill`, no extras) in a fresh venv vs the full
           install: site-packages MiB (torch's share), and a ClientApp process's start-up, one that
           trains nothing and one that trains (fresh process, median of 5); the device self-check
           (plain, signed, DP-SGD, SecAgg+ rounds) in the device venv, and one real round answered
           by flower-supernode processes of the device venv.
  comms    upload bytes and accuracy for answers in float32, float16, uint8 and one-byte votes.
  scale    time per round and peak RSS (whole process tree) for 10, 100 and 1000 clients (q = 0.1)
           and 10,000 clients (q = 0.01, IID: about 100 per round, as at 1000), and the
           orchestration overhead: the same 100-client run on Flower's simulation engine vs
           in-process (bench/inprocess.py), measured in the same benchmark.
  ceiling  no DP: the student trained on the reference set's true labels (its ceiling) and the
           accuracy of the fleet's aggregated answers as every client joins (bench/ceiling.py).
  fuzz     10,000 hypothesis-generated distill replies (and issue 15's failing ones) through the
           server path: validation, aggregation, device ledger, report; counts crashes and schema
           violations that reached aggregation (bench/fuzz.py; --set cases=N --set seed=S).
  headline the Fashion-MNIST headline table: configs/fashion-fleet.toml at each privacy setting and
           the FedAvg / DP-FedAvg peers, each with its public-only control, private gain and gap
           closed (bench/headline.py; --set rounds=N --set seeds=N --set methods='"a,b"').
  soak     the restart soak: 10 SuperNodes on loopback (TLS, node auth, record-level DP), 3 of
           them and the SuperLink killed with SIGKILL mid-round and restarted, the run resumed;
           checks every device's ledger against results.json (bench/soak.py; also run by `deploy`;
           writes bench/results/deploy/soak.json + soak.png).
  ablation no DP, outside the loop: which mechanism makes the private data count (plain votes,
           prior correction, abstention, consensus gate), each as labels for a FixMatch student
           against the same student on public labels alone (bench/ablation.py).

  canary   the privacy officer's deployment audit calibrated: digits, 12 clients + 128 audit slots,
           client-level epsilon 1, 4, 16 and no DP, and a broken run (no noise, claims 1): claimed vs
           estimated mu and epsilon, lower bounds, the interval's width vs audit nodes; accuracy with and
           without audit slots on 12 clients + 4 slots (bench/canary.py).

Suites made of several runs keep each run's folder under runs/; a run whose results.json
exists is not repeated (rerun with --keep to continue an interrupted suite).

Layout: this module is the CLI only. Each suite is a module of the package (bench/core.py,
bench/privacy.py, ...) with a function of the suite's name, ``(out, overrides) -> summary``,
registered in :data:`SUITES`; what suites share is bench/common.py; `readme` is bench/readme.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

#: suite name -> "module:function" that runs it, ``(out: Path, overrides: dict) -> summary``.
#: Imported only when the suite runs, so that ``--help`` and ``readme`` stay quick.
SUITES: dict[str, str] = {
    "headline": "bench.headline:headline",
    "core": "bench.core:core",
    "audit": "bench.audit:audit",
    "deploy": "bench.deploy:deploy",
    "install": "bench.install:install",
    "privacy": "bench.privacy:privacy",
    "faults": "bench.faults:faults",
    "comms": "bench.comms:comms",
    "scale": "bench.scale:scale",
    "frontier": "bench.frontier:frontier",
    "profile": "bench.profile:profile",
    "ceiling": "bench.ceiling:ceiling",
    "fuzz": "bench.fuzz:fuzz",
    "ablation": "bench.ablation:ablation",
    "soak": "bench.soak:soak",
    "canary": "bench.canary:canary",
}
#: suites that write into another suite's folder (which they leave in place)
RESULTS_FOLDER = {"soak": "deploy"}


def suite(name: str) -> Callable[[Path, dict], dict]:
    """The function that runs suite ``name`` (its module imported now)."""
    module, _, function = SUITES[name].partition(":")
    return getattr(importlib.import_module(module), function)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument(
        "suite",
        choices=sorted([*SUITES, "readme"]),
        help="a suite, or `readme`: rewrite the README's tables from bench/results/*/*.json",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (TOML value)")
    parser.add_argument("--keep", action="store_true", help="keep finished runs of an interrupted suite")
    args = parser.parse_args()
    if args.suite == "readme":
        from bench.readme import update

        print("README blocks written:", ", ".join(update()) or "none")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from flwr.supercore.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.WARNING)
    FLOWER_LOGGER.propagate = False
    from feddistill.config import parse_override

    overrides = dict(parse_override(s) for s in args.set)
    out = args.out or Path("bench/results") / RESULTS_FOLDER.get(args.suite, args.suite)
    if out.exists() and not args.keep and args.suite not in RESULTS_FOLDER:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(suite(args.suite)(out, overrides), indent=2))


if __name__ == "__main__":
    main()
