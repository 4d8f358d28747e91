"""Every config key is usable in every entry point: Flower rejects a run-config key that
pyproject's ``[tool.flwr.app.config]`` does not declare, so that table must hold exactly the
keys of the config schema, with the schema's defaults. The keys come from the schema itself
(every RunConfig field, flattened with dots and dashes), so a field added to config.py and
forgotten in pyproject.toml fails here."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from feddistill.config import RunConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def _schema_defaults() -> dict[str, object]:
    """Every leaf field of RunConfig with its default, in Flower's flat form, built from the
    dataclass fields (not from to_flat, the code under test's own view)."""
    flat: dict[str, object] = {}
    for f in dataclasses.fields(RunConfig):
        value = getattr(RunConfig(), f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                flat[f"{f.name}.{sub.name.replace('_', '-')}"] = getattr(value, sub.name)
        else:
            flat[f.name.replace("_", "-")] = value
    return flat


def _flwr_table() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_flower_table_has_exactly_the_schema_keys_with_their_defaults() -> None:
    schema, table = _schema_defaults(), _flwr_table()
    assert sorted(set(schema) - set(table)) == [], "keys Flower would reject: add them to [tool.flwr.app.config]"
    assert sorted(set(table) - set(schema)) == [], "keys the schema does not know"
    # same value and same type (TOML's 0 is an int, 0.0 a float; True == 1 in Python)
    wrong = {k: (table[k], schema[k]) for k in schema if (type(table[k]), table[k]) != (type(schema[k]), schema[k])}
    assert wrong == {}
    assert schema == RunConfig().to_flat()  # the form Flower's run config takes
    assert parse_config(table, "pyproject.toml") == RunConfig()


def test_security_and_scenario_keys_are_in_the_table() -> None:
    """The keys the issue found missing (signed downloads could not be switched on under flwr run)."""
    table = _flwr_table()
    for key in (
        "security.signing-key",
        "security.release-public-key",
        "distill.trim-beta",
        "distill.keep-fraction",
        "distill.client-start",
        "baselines.dp-fedavg",
        "baselines.dp-fedavg-clip",
        "scenario.hostile-fraction",
        "scenario.attack",
        "scenario.dropout",
    ):
        assert key in table


def test_digits_config_differs_from_the_defaults_only_where_its_comment_says() -> None:
    """configs/digits.toml's header: the defaults, except output-dir and [audit]."""
    text = (ROOT / "configs" / "digits.toml").read_text()
    assert "differs-from-defaults: output-dir, audit.keep-artifacts, audit.canaries" in text
    digits, defaults = load_config(ROOT / "configs" / "digits.toml").to_flat(), RunConfig().to_flat()
    differ = sorted(k for k in defaults if digits[k] != defaults[k])
    assert differ == ["audit.canaries", "audit.keep-artifacts", "output-dir"]
