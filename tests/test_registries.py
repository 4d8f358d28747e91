"""Registries and names (issue 17, item 5): one list of names per kind, read by the code that
runs an entry and by the config that accepts its name; adding an aggregator is its file plus
one registration, and the README's example of exactly that runs here."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from feddistill.config import ConfigError, RunConfig, flat_run_config, load_config, parse_config, parse_override
from feddistill.registry import Registry
from feddistill.strategies import AGGREGATORS, AnswerStrategy, make_strategy
from feddistill.strategies.registry import config_value, setting_name

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(sampling_rate=1.0, sampling="poisson", seed=0)


def readme_example() -> str:
    """The Python block of README.md's Layout section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", layout, flags=re.S)
    assert len(blocks) == 1, "README.md's Layout section holds one Python block: the new aggregator"
    return blocks[0]


@pytest.fixture()
def readme_aggregator():
    """The README's example, executed as written, registered for the test only."""
    before = AGGREGATORS.names()
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(readme_example(), "README.md (Layout)", "exec"), namespace)
    added = [name for name in AGGREGATORS.names() if name not in before]
    assert len(added) == 1, f"the example registers one aggregator, it registered {added}"
    try:
        yield added[0], namespace
    finally:
        AGGREGATORS.unregister(added[0])


def test_the_readme_aggregator_is_built_and_accepted_by_the_config(readme_aggregator):
    name, namespace = readme_aggregator
    cls = next(
        v
        for v in namespace.values()
        if isinstance(v, type) and issubclass(v, AnswerStrategy) and v is not AnswerStrategy
    )
    cfg = parse_config({"distill": {"aggregator": name}}, "test")  # the config accepts the new name
    assert cfg.distill.aggregator == name
    assert load_config(None, {"distill.aggregator": name}).distill.aggregator == name  # --set too
    strategy = make_strategy(cfg.distill.aggregator, cfg=cfg, **COMMON)
    assert type(strategy) is cls and strategy.name == name
    answers = np.random.default_rng(0).dirichlet(np.ones(10), size=(4, 6)).astype(np.float32)  # (K, |Q|, C)
    signal = strategy.aggregate_answers(answers, np.ones(4))
    assert signal.shape == (6, 10) and np.allclose(signal.sum(axis=1), 1.0)
    geometric = np.exp(np.log(answers[:, 0]).mean(axis=0))
    np.testing.assert_allclose(signal[0], geometric / geometric.sum(), rtol=1e-5)


def test_an_aggregator_nobody_registered_is_refused_by_both():
    name = "geometric-median"
    assert name not in AGGREGATORS
    with pytest.raises(ConfigError, match=f"'distill.aggregator' = '{name}' is not one of .*mean"):
        parse_config({"distill": {"aggregator": name}}, "test")
    with pytest.raises(ValueError, match=f"unknown aggregator '{name}' \\(known: .*mean"):
        make_strategy(name, **COMMON)


def test_built_in_aggregators_register_themselves_with_keys_the_config_has():
    assert set(AGGREGATORS) >= {"mean", "era", "median", "trimmed-mean", "outlier-filtered"}
    cfg = RunConfig()
    for name, entry in AGGREGATORS.items():
        assert entry.name == name and entry.factory.name == name
        for keyword, source in entry.reads.items():
            value = source(cfg) if callable(source) else config_value(cfg, source)  # the key exists
            assert value is not None, (name, keyword)
        assert parse_config({"distill": {"aggregator": name}}, "test").distill.aggregator == name


def test_make_strategy_reads_the_config_and_the_server_keywords_alike():
    cfg = load_config(
        None,
        {
            "distill.aggregator": "trimmed-mean",
            "distill.trim-beta": 0.3,
            "privacy.bound": "clipped_logits",
            "privacy.clip-norm": 2.0,
        },
    )
    from_config = make_strategy("trimmed-mean", cfg=cfg, **COMMON)
    assert (from_config.beta, from_config.probabilities) == (0.3, False)
    # the keywords the server's builder passes (one per setting, whatever the aggregator)
    legacy = dict(era_temperature=0.2, trim_beta=0.4, keep_fraction=0.5, probabilities=True, abstain=True)
    assert make_strategy("trimmed-mean", **COMMON, **legacy).beta == 0.4
    assert make_strategy("era", **COMMON, **legacy).temperature == 0.2
    assert make_strategy("outlier-filtered", **COMMON, **legacy).keep_fraction == 0.5
    assert make_strategy("mean", **COMMON, **legacy).abstain is True
    assert make_strategy("trimmed-mean", cfg=cfg, **COMMON, trim_beta=0.1).beta == 0.1  # a setting beats the config
    assert make_strategy("median", **COMMON).probabilities is True  # neither: the class default
    with pytest.raises(TypeError, match="no aggregator reads trim_betta"):
        make_strategy("trimmed-mean", **COMMON, trim_betta=0.1)
    assert setting_name("beta", "distill.trim-beta") == "trim_beta"


def test_the_other_registries_are_what_the_config_and_the_code_accept():
    from feddistill.data.datasets import DATASET_CLASSES, DATASETS, FLIP_KEEPS_CLASS, DataError, load_dataset
    from feddistill.privacy import accounting
    from feddistill.privacy.audit.attacks import ATTACKS, attack_scores

    assert tuple(DATASETS) == ("digits", "fashion-mnist")
    assert dict(DATASET_CLASSES) == {"digits": 10, "fashion-mnist": 10}
    assert dict(FLIP_KEEPS_CLASS) == {"digits": False, "fashion-mnist": True}
    with pytest.raises(ConfigError, match="'data.dataset' = 'mnist' is not one of digits, fashion-mnist"):
        parse_config({"data": {"dataset": "mnist"}}, "test")
    with pytest.raises(DataError, match="unknown data set 'mnist'; valid names: digits, fashion-mnist"):
        load_dataset("mnist")

    assert tuple(accounting.ACCOUNTANTS) == ("pld", "rdp", "prv") and "gdp" not in accounting.ACCOUNTANTS
    with pytest.raises(ValueError, match=r"accountant must be one of \('pld', 'rdp', 'prv'\), got 'gdp'"):
        accounting.epsilon([accounting.GaussianEvent(1.0, 1.0, 1)], 1e-5, accountant="gdp")
    event = [accounting.GaussianEvent(2.0, 1.0, 3)]
    assert accounting.epsilon_rdp_opacus(event, 1e-5) > 0  # the cross-check, outside the registry

    assert tuple(ATTACKS) == ("loss", "lira_offline", "lira_online", "rmia", "rmia_offline")
    assert ATTACKS.index("rmia") == 3
    rng = np.random.default_rng(0)
    n, z, k, c = 8, 6, 4, 3
    probs = lambda *shape: rng.dirichlet(np.ones(c), size=shape)  # noqa: E731
    mask_x = np.array([[True] * n, [True] * n, [False] * n, [False] * n])
    mask_z = np.array([[True] * z, [True] * z, [False] * z, [False] * z])
    scores, skipped = attack_scores(
        probs(n), probs(z), probs(k, n), probs(k, z), rng.integers(0, c, n), rng.integers(0, c, z), mask_x, mask_z
    )
    assert list(scores) == list(ATTACKS) and skipped == {}
    scores, skipped = attack_scores(
        probs(n),
        probs(z),
        probs(0, n),
        probs(0, z),
        rng.integers(0, c, n),
        rng.integers(0, c, z),
        mask_x[:0],
        mask_z[:0],
    )
    assert list(scores) == ["loss"] and list(skipped) == list(ATTACKS)[1:]


def test_a_registry_reads_like_the_tuple_it_replaced():
    found = []
    registry: Registry = Registry("widget", discover=lambda: found.append(registry.register("b", 2)))
    registry.register("a", 1)
    assert not found  # discovery waits for the first read
    assert registry.names() == ("a", "b") and found == [2] and repr(registry) == "('a', 'b')"
    assert "b" in registry and registry.index("b") == 1 and f"{registry}" == "('a', 'b')"
    registry.register("a", 1)  # the same entry again: a no-op
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register("a", 3)
    with pytest.raises(ValueError, match=r"unknown widget 'c' \(known: a, b\)"):
        registry.lookup("c")
    assert dict(registry.view("real")) == {"a": 1, "b": 2}


def test_one_override_parser_and_one_flattening():
    assert parse_override("fleet.num-clients=20") == ("fleet.num-clients", 20)
    assert parse_override(' data.dataset = "digits"') == ("data.dataset", "digits")
    assert parse_override("data.dataset=fashion-mnist") == ("data.dataset", "fashion-mnist")  # a bare string
    with pytest.raises(ConfigError, match=r"--set 'rounds': expected KEY=VALUE"):
        parse_override("rounds")
    cfg = RunConfig()
    assert flat_run_config(cfg.to_dict()) == cfg.to_flat()
    assert flat_run_config({"fleet": {"num_clients": 3}, "distill.trim_beta": 0.3, "rounds": 2}) == {
        "fleet.num-clients": 3,
        "distill.trim-beta": 0.3,
        "rounds": 2,
    }
    assert parse_config(cfg.to_flat(), "flat") == cfg


def test_one_release_id():
    from feddistill.deploy import download_signing
    from feddistill.server import gate

    assert gate.release_id(3) == "r0003"
    assert not hasattr(download_signing, "release_id") and download_signing.download_id(3) == "teacher-signal-round-3"
