"""What a newcomer sees (issue 17): complete tables when output is piped, no misleading
calibration, quiet simulation start, ignored device files, one set of defaults."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


# ---- 1. piped output: plain, complete tables ----


def _summary_results() -> dict:
    from feddistill.config import RunConfig

    rounds = [
        {
            "round": r,
            "clients": 10,
            "replies": 10,
            "dropped": {},
            "teacher_accuracy": 0.901,
            "student_accuracy": 0.88,
            "student_ece": 0.031,
            "agreement": 0.933,
            "bytes_uploaded": 201_300,
        }
        for r in (1, 2, 3)
    ]
    return {
        "method": "feddistill",
        "config": RunConfig().to_dict(),
        "rounds": rounds,
        "public_teacher": {"test_accuracy": 0.75},
        "public_only_student": {"test_accuracy": 0.7},
        "final": {
            "student_accuracy": 0.9,
            "bytes_per_client_round": 20_130,
            "private_gain": 3.1,
            "gap_closed": 0.4,
            "fleet_labelled_rows": 1234,
        },
        "baselines": {
            "public_control": {"accuracy": 0.86},
            "centralized": {"accuracy": 0.95},
            "fedavg": {"accuracy": 0.6, "bytes_per_client_round": 90_000, "init": "public"},
        },
    }


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("columns", [None, "60"])
def test_summary_tables_are_complete_when_stdout_is_not_a_terminal(columns, monkeypatch) -> None:
    from feddistill.console import make_console
    from feddistill.report import print_summary

    for var in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS"):
        monkeypatch.delenv(var, raising=False)
    if columns:
        monkeypatch.setenv("COLUMNS", columns)  # an exported COLUMNS must not cut piped tables either
    out = _Pipe()
    print_summary(_summary_results(), make_console(file=out))
    text = out.getvalue()
    lines = text.splitlines()
    assert "\x1b[" not in text  # plain: no colour codes in a file
    assert "…" not in text  # nothing cut
    header = next(line for line in lines if "round" in line and "uploaded" in line)
    for col in ("teacher signal acc", "student acc", "student ECE", "agreement", "uploaded"):
        assert col in header
    for row in (line for line in lines if "201.3 KB" in line):
        assert "93.3 %" in row and "90.1 %" in row  # each round on one line
    assert sum("201.3 KB" in line for line in lines) == 3
    assert any("public-only control (same server pipeline, no fleet)" in line and "86.0 %" in line for line in lines)
    assert any("1234 reference rows labelled by the fleet" in line for line in lines)
    rule = lines[0]
    assert "feddistill: digits" in rule and len(rule) < 200  # the rule spans its title, not the plain width


def test_terminal_console_keeps_rich_layout() -> None:
    from rich.table import Table

    from feddistill.console import make_console

    out = io.StringIO()
    console = make_console(file=out)
    console._force_terminal = True  # as on a terminal
    console.width = 40
    table = Table()
    table.add_column("a long column header that does not fit")
    table.add_row("a long cell value that does not fit in forty columns either")
    console.print(table)
    assert max(len(line) for line in out.getvalue().splitlines()) <= 40


def test_cli_console_is_the_plain_one() -> None:
    from feddistill import cli
    from feddistill.console import CliConsole

    assert isinstance(cli.console, CliConsole)


# ---- 2. temperature scaling is kept only when it helps on held-out data ----


def _calibrated(rng, n: int, classes: int = 10) -> tuple:
    """Logits and labels drawn from the logits' own softmax: calibrated at T = 1 by construction."""
    from feddistill.calibration import softmax

    logits = rng.normal(0, 2.0, size=(n, classes))
    labels = (softmax(logits).cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


def test_temperature_that_hurts_held_out_nll_is_not_kept() -> None:
    from feddistill.calibration import calibrate

    # 10 examples, 5 interleaved folds: fold 0 (examples 0 and 5) is confidently wrong, the rest
    # confidently right. Fitted without fold 0, T sharpens the logits and fold 0's NLL explodes.
    logits = np.zeros((10, 2))
    logits[:, 0] = 4.0
    labels = np.zeros(10, dtype=int)
    labels[[0, 5]] = 1
    test = (np.array([[4.0, 0.0], [4.0, 0.0]]), np.array([0, 1]))
    cal = calibrate(logits, labels, extra={"test": test})
    assert cal.fitted_temperature != pytest.approx(1.0)  # the fit on all ten moved T ...
    assert cal.criterion["after"] > cal.criterion["before"]  # ... but held out, it is worse
    assert not cal.kept and cal.temperature == 1.0
    assert cal.after == cal.before  # the release is exactly the uncalibrated student
    assert cal.validation_size == 10 and cal.criterion["name"] == "nll" and cal.criterion["folds"] == 5
    record = cal.to_dict()  # what the release records (index.json, results.json)
    for key in (
        "temperature",
        "fitted_on",
        "before",
        "after",
        "fitted_temperature",
        "kept",
        "validation_size",
        "criterion",
    ):
        assert key in record
    json.dumps(record)


def test_temperature_that_helps_is_kept() -> None:
    from feddistill.calibration import calibrate

    rng = np.random.default_rng(0)
    logits, labels = _calibrated(rng, 700)
    logits *= 4.0  # overconfident: the right T is about 4
    val, test = slice(0, 200), slice(200, None)
    cal = calibrate(logits[val], labels[val], extra={"test": (logits[test], labels[test])})
    assert cal.kept and cal.temperature == cal.fitted_temperature and 3.0 < cal.temperature < 5.5
    assert cal.criterion["after"] < cal.criterion["before"]
    assert cal.after["test"]["nll"] < cal.before["test"]["nll"] and cal.after["test"]["ece"] < cal.before["test"]["ece"]
    assert cal.validation_size == 200


def test_on_small_splits_the_rule_beats_always_scaling() -> None:
    """The quick start's case: 20 validation examples of a calibrated student. Always applying the
    fitted T makes test NLL worse on average; keeping it only when it helps held out does not."""
    from feddistill.calibration import _nll, calibrate

    always, rule, none = [], [], []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        (val_x, val_y), (test_x, test_y) = _calibrated(rng, 20), _calibrated(rng, 1000)
        cal = calibrate(val_x, val_y)
        always.append(_nll(test_x, test_y, cal.fitted_temperature))
        rule.append(_nll(test_x, test_y, cal.temperature))
        none.append(_nll(test_x, test_y, 1.0))
    assert np.mean(always) > np.mean(none)
    assert np.mean(rule) < np.mean(always)


def test_fit_temperature_finds_the_nll_minimum() -> None:
    from feddistill.calibration import MAX_T, _nll, fit_temperature

    rng = np.random.default_rng(1)
    logits, labels = _calibrated(rng, 300)
    logits *= 2.5
    t = fit_temperature(logits, labels)
    for other in (t * 0.98, t * 1.02):
        assert _nll(logits, labels, t) < _nll(logits, labels, other)
    assert fit_temperature(np.zeros((5, 3)), np.arange(5) % 3) == 1.0  # flat logits: T does not matter
    assert fit_temperature(np.array([[5.0, 0.0]]), np.array([1])) == MAX_T  # only wrong: as cool as allowed
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_the_gate_records_the_decision_and_saves_the_applied_temperature(tmp_path: Path) -> None:
    import torch

    from feddistill.config import load_config
    from feddistill.models import build_model
    from feddistill.server.gate import Releaser, load_release_model

    rng = np.random.default_rng(0)
    x = lambda n: torch.from_numpy(rng.normal(0, 1, size=(n, 1, 8, 8)).astype(np.float32))  # noqa: E731
    val_y = rng.integers(0, 10, size=20)
    cfg = load_config(None, {"output_dir": str(tmp_path)})
    rel = Releaser(
        tmp_path,
        cfg,
        reference_digest="d" * 64,
        model_name="mlp",
        validation=(x(20), val_y),
        reference_x=x(30),
        test=(x(40), rng.integers(0, 10, size=40)),
    )
    rel.consider(
        0,
        build_model("mlp", 8, 10, seed=0),
        np.eye(10, dtype=np.float32)[rng.integers(0, 10, size=30)],
        test_metrics={"accuracy": 0.0, "nll": 0.0, "ece": 0.0},
        client_epsilon=None,
        record_epsilon=None,
        build=lambda: build_model("mlp", 8, 10),
    )
    release, blob = load_release_model(tmp_path, "r0000")
    cal = release.calibration
    assert cal["validation_size"] == 20 and isinstance(cal["kept"], bool)
    assert set(cal["criterion"]) >= {"name", "before", "after", "folds"}
    assert blob["temperature"] == cal["temperature"] == (cal["fitted_temperature"] if cal["kept"] else 1.0)


# ---- 5. a simulation starts without Flower's and Ray's boilerplate warnings ----


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_simulation_noise_filter_drops_exactly_the_three_messages() -> None:
    import inspect

    import flwr.simulation.run_simulation as flwr_run_simulation
    from flwr.serverapp.strategy import FedAvg
    from flwr.supercore.logger import FLOWER_LOGGER, log, warn_deprecated_feature

    from feddistill.simulations import quiet

    # the texts filtered are the libraries' own (a new Flower or Ray wording would need a new filter)
    source = inspect.getsource(flwr_run_simulation)
    assert "The `run_simulation` function is deprecated" in source
    ray_worker = Path(importlib.util.find_spec("ray").submodule_search_locations[0]) / "_private" / "worker.py"
    assert quiet.RAY_ACCELERATOR_TIP in "".join(line.strip().strip('"') for line in ray_worker.read_text().splitlines())

    records = _Records()
    level = FLOWER_LOGGER.level
    FLOWER_LOGGER.addHandler(records)
    FLOWER_LOGGER.setLevel(logging.DEBUG)
    try:
        quiet.silence_simulation_noise()
        quiet.silence_simulation_noise()  # idempotent: one filter
        assert sum(isinstance(f, quiet._FlowerNoiseFilter) for f in FLOWER_LOGGER.filters) == 1
        warn_deprecated_feature("The `run_simulation` function is deprecated and will be removed ...")
        FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
        # ... and what must still come through
        warn_deprecated_feature("Passing `clients_ids` to `start_simulation` is deprecated")
        FedAvg(fraction_train=0.0, fraction_evaluate=1.0)
        log(logging.WARNING, "fraction_evaluate is set to %s by the user", 0.5)
        log(logging.ERROR, "a ClientApp raised an exception")
    finally:
        FLOWER_LOGGER.removeHandler(records)
        FLOWER_LOGGER.setLevel(level)
        for f in [f for f in FLOWER_LOGGER.filters if isinstance(f, quiet._FlowerNoiseFilter)]:
            FLOWER_LOGGER.removeFilter(f)  # (pytest restores the warnings filters by itself)
    text = "\n".join(records.messages)
    assert "run_simulation" not in text and "fraction_evaluate is set to 0.0" not in text
    assert "clients_ids" in text and "fraction_train is set to 0.0" in text
    assert "fraction_evaluate is set to 0.5 by the user" in text and "a ClientApp raised an exception" in text

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.silence_simulation_noise()
        warnings.warn(quiet.RAY_ACCELERATOR_TIP + " env var if num_gpus=0 ...", FutureWarning, stacklevel=1)
        warnings.warn(quiet.RAY_ACCELERATOR_TIP + " (same text, another category)", UserWarning, stacklevel=1)
        warnings.warn(
            "Pydantic v1 is deprecated and will no longer be supported in Ray 2.56.", FutureWarning, stacklevel=1
        )
    assert [str(w.message)[:8] for w in caught] == ["Tip: In ", "Pydantic"]
    assert caught[0].category is UserWarning


# ---- 3. what the device recipe creates in the repo root stays out of git and out of `flwr run .` ----

DEVICE_RECIPE_FILES = [
    "devices/device-0/private.npz",
    "devices/device-1/state/ledger.json",
    "certs/ca.crt",
    "certs/supernode-0.key",
    "certs/notes.json",
    "superlink.db",
    "superlink.db-shm",
    "superlink.db-wal",
    "runs/devices/results.json",
    "runs/flwr/config.json",
]


@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")  # flwr's pathspec call
def test_gitignore_covers_the_device_recipes_files() -> None:
    from flwr.cli.utils import build_pathspec, load_gitignore_patterns

    spec = build_pathspec(load_gitignore_patterns(ROOT / ".gitignore"))  # what `flwr run .` packs by
    assert [p for p in DEVICE_RECIPE_FILES if not spec.match_file(p)] == []
    for kept in (
        "pyproject.toml",
        "src/feddistill/cli.py",
        "configs/digits.toml",
        "tests/test_newcomer.py",
        "src/feddistill/deploy/certs.py",
        "bench/results/frontier/runs/alpha0.5-seed0-era/results.json",
    ):
        assert not spec.match_file(kept), kept


@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")  # flwr's pathspec call
def test_flwr_packs_none_of_the_device_recipes_files() -> None:
    from flwr.cli.utils import filter_paths_for_publish

    files = {
        ".gitignore": ROOT / ".gitignore",
        "pyproject.toml": ROOT / "pyproject.toml",
        "src/feddistill/cli.py": ROOT / "src" / "feddistill" / "cli.py",
        **{p: b"{}" for p in DEVICE_RECIPE_FILES},
    }
    packed = filter_paths_for_publish(files)
    assert sorted(packed) == [".gitignore", "pyproject.toml", "src/feddistill/cli.py"]


# ---- 4. the license is an SPDX string (no setuptools deprecation warning) ----


def test_license_is_an_spdx_string_for_a_setuptools_that_reads_it() -> None:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"
    # the SPDX form needs setuptools >= 77 (older ones reject a string)
    assert "setuptools>=77" in pyproject["build-system"]["requires"]


# ---- 7. configs/digits.toml and the defaults `flwr run .` uses agree where its comment says ----


def _flat(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_digits_config_agrees_with_the_flower_table_except_where_its_comment_says() -> None:
    import tomllib

    from feddistill.config import load_config, parse_config

    text = (ROOT / "configs" / "digits.toml").read_text()
    declared = next(line for line in text.splitlines() if "differs-from-defaults:" in line)
    in_order = [k.strip() for k in declared.split("differs-from-defaults:")[1].split(",")]
    declared = sorted(in_order)
    digits = _flat(tomllib.loads(text))
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    both = set(digits) & set(table)
    assert both == set(digits), "a key of digits.toml that `flwr run .` would reject"
    differ = sorted(k for k in both if (type(digits[k]), digits[k]) != (type(table[k]), table[k]))
    assert differ == declared
    # the whole parsed configs too: the quick start is `flwr run .` plus exactly those keys
    quick = load_config(ROOT / "configs" / "digits.toml").to_flat()
    flower = parse_config(table, "pyproject.toml").to_flat()
    assert sorted(k for k in flower if quick[k] != flower[k]) == declared
    # ... and the README's `flwr run .` section says how to get the quick start's numbers
    overrides = " ".join(f"{k}={str(digits[k]).lower()}" for k in in_order if k.startswith("audit."))
    assert overrides == "audit.keep-artifacts=true audit.canaries=100"
    assert overrides in (ROOT / "README.md").read_text()


def test_report_says_whether_the_fitted_temperature_was_kept() -> None:
    from feddistill.report import _calibration_decision

    crit = {
        "name": "nll",
        "estimate": "5-fold cross-fitting on the validation split",
        "folds": 5,
        "before": 0.484,
        "after": 0.512,
    }
    rejected = {
        "temperature": 1.0,
        "fitted_temperature": 1.297,
        "kept": False,
        "validation_size": 20,
        "criterion": crit,
    }
    text = _calibration_decision(rejected)
    assert "the fitted T = 1.297 was not kept (T = 1)" in text and "20 examples" in text
    assert "0.484 at T = 1, 0.512 at the fitted T" in text
    assert _calibration_decision({**rejected, "kept": True, "temperature": 1.297}).startswith("; kept: held-out NLL")
    assert _calibration_decision({"temperature": 1.5, "fitted_on": "x", "before": {}, "after": {}}) == ""  # older runs
