"""`python -m bench SUITE`: every name of the registry runs a function of its own suite module."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

from bench.__main__ import SUITES, suite

ROOT = Path(__file__).resolve().parents[1]


def test_every_suite_names_a_function_of_its_module():
    for name, where in SUITES.items():
        module, _, function = where.partition(":")
        assert module == f"bench.{name}" and function == name, f"{name}: {where}"
        run = suite(name)
        assert callable(run) and list(inspect.signature(run).parameters)[:2] == ["out", "overrides"], name


def test_the_cli_lists_every_suite_and_readme():
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "{" + ",".join(sorted([*SUITES, "readme"])) + "}" in out
