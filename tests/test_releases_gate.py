"""Versioned releases: the validation gate promotes improvements, rejects regressions (rollback keeps
the last good release), and temperature scaling calibrates a miscalibrated model."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from feddistill.calibration import calibrate, fit_temperature, reliability_bins, softmax
from feddistill.cli import cli
from feddistill.config import ConfigError, ReleaseConfig, load_config, parse_config
from feddistill.models import build_model
from feddistill.server.gate import (
    GateMetrics,
    ReleaseError,
    ReleaseHistory,
    Releaser,
    gate_decision,
    load_index,
    load_release_model,
)
from feddistill.training import expected_calibration_error, train_supervised

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CFG = ReleaseConfig(accuracy_tolerance=0.02, ece_tolerance=0.05, agreement_tolerance=0.05)


def test_gate_promotes_an_improvement_and_rejects_each_kind_of_regression():
    current = GateMetrics(accuracy=0.80, ece=0.10, nll=0.6, agreement=0.90)
    ok, reason = gate_decision(GateMetrics(0.85, 0.08, 0.5, 0.92), current, CFG, "r0002")
    assert ok and "no regression" in reason
    ok, _ = gate_decision(GateMetrics(0.785, 0.14, 0.7, 0.86), current, CFG, "r0002")  # within every tolerance
    assert ok
    for bad, what in [
        (GateMetrics(0.75, 0.10, 0.6, 0.90), "validation accuracy 0.750 < r0002's 0.800 - tolerance 0.02"),
        (GateMetrics(0.80, 0.20, 0.6, 0.90), "validation ECE 0.200 > r0002's 0.100 + tolerance 0.05"),
        (GateMetrics(0.80, 0.10, 0.6, 0.80), "agreement with the teacher signal 0.800 < r0002's 0.900"),
    ]:
        ok, reason = gate_decision(bad, current, CFG, "r0002")
        assert not ok and what in reason and "r0002 stays released" in reason
    # the first candidate is always released; with the gate off, every candidate is
    assert gate_decision(GateMetrics(0.1, 0.9, 3.0, 0.1), None, CFG) == (True, "first release")
    off = ReleaseConfig(gate=False)
    assert gate_decision(GateMetrics(0.1, 0.9, 3.0, 0.1), current, off)[0]


def _blobs(n: int, seed: int, classes: int = 10) -> tuple[torch.Tensor, np.ndarray]:
    """Separable 10-class Gaussian blobs shaped like 8x8 images."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(0, 1, size=(classes, 64))
    y = rng.integers(0, classes, size=n)
    x = centres[y] + rng.normal(0, 0.6, size=(n, 64))
    return torch.from_numpy(x.reshape(n, 1, 8, 8).astype(np.float32)), y.astype(np.int64)


def _trained(seed: int, epochs: int = 15) -> torch.nn.Module:
    x, y = _blobs(400, seed=seed)
    model = build_model("mlp", 8, 10, seed=seed)
    train_supervised(model, x, torch.from_numpy(y), epochs=epochs, batch_size=32, lr=0.05, seed=seed)
    return model


def _releaser(tmp_path: Path) -> Releaser:
    cfg = load_config(None, {"output_dir": str(tmp_path), "release.accuracy_tolerance": 0.02})
    val_x, val_y = _blobs(200, seed=1)
    ref_x, ref_y = _blobs(300, seed=2)
    test_x, test_y = _blobs(200, seed=3)
    return Releaser(
        tmp_path,
        cfg,
        reference_digest="d" * 64,
        model_name="mlp",
        validation=(val_x, val_y),
        reference_x=ref_x,
        test=(test_x, test_y),
    )


def _signal(seed: int = 2) -> np.ndarray:
    _, y = _blobs(300, seed=seed)
    return np.eye(10, dtype=np.float32)[y]  # a teacher signal that knows the truth


def _consider(rel: Releaser, rnd: int, model: torch.nn.Module, eps: float) -> dict:
    return rel.consider(
        rnd,
        model,
        _signal(),
        test_metrics={"accuracy": 0.0, "nll": 0.0, "ece": 0.0},
        client_epsilon=eps,
        record_epsilon=None,
        build=lambda: build_model("mlp", 8, 10),
    )


def test_rollback_keeps_the_last_good_release_on_disk_and_in_memory(tmp_path):
    rel = _releaser(tmp_path)
    untrained = build_model("mlp", 8, 10, seed=7)
    good = _trained(seed=0)
    first = _consider(rel, 0, untrained, 0.0)
    assert first == {"candidate": "r0000", "promoted": True, "reason": "first release", "current": "r0000"}
    improved = _consider(rel, 1, good, 0.5)
    assert improved["promoted"] and improved["current"] == "r0001"
    regressed = _consider(rel, 2, build_model("mlp", 8, 10, seed=99), 0.8)  # a broken candidate
    assert not regressed["promoted"] and regressed["current"] == "r0001"
    assert "regression" in regressed["reason"] and "r0001 stays released" in regressed["reason"]

    # the released student is still the good one, bit for bit
    released = rel.released_model(lambda: build_model("mlp", 8, 10))
    for key, value in good.state_dict().items():
        assert torch.equal(released.state_dict()[key], value)
    # on disk: promoted students only, and an index with every candidate, its parent, digest and epsilon
    assert (tmp_path / "releases" / "r0001.pt").is_file() and not (tmp_path / "releases" / "r0002.pt").exists()
    history = load_index(tmp_path)
    assert history.current == "r0001" and [r.id for r in history.releases] == ["r0000", "r0001", "r0002"]
    r2 = history.get("r0002")
    assert (r2.parent, r2.status, r2.client_epsilon, r2.reference_digest) == ("r0001", "rejected", 0.8, "d" * 64)
    assert history.get("r0001").config_digest == rel.cfg.digest()
    release, blob = load_release_model(tmp_path, "r0001")
    assert blob["release"] == "r0001" and blob["temperature"] == release.calibration["temperature"]
    with pytest.raises(ReleaseError, match="gate rejected, never released"):
        load_release_model(tmp_path, "r0002")
    with pytest.raises(ReleaseError, match="no release 'r0042'"):
        load_release_model(tmp_path, "r0042")
    # the history survives a checkpoint round trip (what --resume restores)
    state = rel.checkpoint_state()
    restored = ReleaseHistory.from_dict(json.loads(json.dumps(state["releases"])))
    assert restored.to_dict() == history.to_dict()


def test_gate_reuses_the_servers_predictions_and_decides_exactly_as_without_them(tmp_path):
    """The server hands the gate the outputs it computed for its own metrics; the gate must not
    infer them again (it would cost a reference- and a test-set pass per round) and must reach
    the same decisions, metrics and calibration as when it computes everything itself."""
    from feddistill.server.gate import Predictions
    from feddistill.training import predict_logits

    models = [build_model("mlp", 8, 10, seed=7), _trained(seed=0), build_model("mlp", 8, 10, seed=99)]
    own, given = _releaser(tmp_path / "own"), _releaser(tmp_path / "given")
    real = given._outputs
    calls: list[bool] = []  # one entry per reference-set pass the gate asks for: True = it ran inference
    given._outputs = lambda m, labels=None: calls.append(labels is None) or real(m, labels)
    for rnd, model in enumerate(models):
        a = _consider(own, rnd, model, 0.0)
        ref_x = given.ref_x
        predictions = Predictions(
            predict_logits(model, ref_x).numpy().argmax(1), predict_logits(model, given.test_x).numpy()
        )
        calls.clear()
        b = given.consider(
            rnd,
            model,
            _signal(),
            test_metrics={"accuracy": 0.0, "nll": 0.0, "ece": 0.0},
            client_epsilon=0.0,
            record_epsilon=None,
            build=lambda: build_model("mlp", 8, 10),
            predictions=predictions,
        )
        assert a == b
        assert calls == [False]  # the candidate's reference pass was reused; the released one's was kept
    mine, theirs = load_index(tmp_path / "own").to_dict(), load_index(tmp_path / "given").to_dict()
    for release in (*mine["releases"], *theirs["releases"]):
        release.pop("config_digest")  # the two run folders differ, hence their configs
    assert json.dumps(mine, sort_keys=True) == json.dumps(theirs, sort_keys=True)


def test_temperature_scaling_lowers_ece_on_an_overconfident_model():
    rng = np.random.default_rng(0)
    n, classes = 2000, 10
    y = rng.integers(0, classes, size=n)
    # 70 % accurate, but logits scaled x6: confidences near 1 (deliberately miscalibrated)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, classes, size=n))
    logits = rng.normal(0, 1, size=(n, classes))
    logits[np.arange(n), pred] += 3.0
    logits *= 6.0
    val, test = slice(0, 500), slice(500, None)
    t = fit_temperature(logits[val], y[val])
    assert t > 2.0  # it must cool the logits down
    cal = calibrate(logits[val], y[val], extra={"test": (logits[test], y[test])})
    for split in ("validation", "test"):
        assert cal.before[split]["ece"] > 0.15
        assert cal.after[split]["ece"] < cal.before[split]["ece"] / 2
        assert cal.after[split]["nll"] < cal.before[split]["nll"]
        assert cal.after[split]["accuracy"] == cal.before[split]["accuracy"]  # argmax unchanged
    assert expected_calibration_error(softmax(logits[test], t), y[test]) == pytest.approx(cal.after["test"]["ece"])
    bins = reliability_bins(softmax(logits[test], t), y[test])
    assert sum(bins["count"]) == len(y[test])


def test_release_config_is_validated_and_in_the_flower_run_config():
    with pytest.raises(ConfigError, match="'release.validation-fraction' must be > 0"):
        parse_config({"release": {"validation-fraction": 0.0}}, "x.toml")
    parse_config({"release": {"validation-fraction": 0.0, "gate": False, "calibrate": False}}, "x.toml")
    with pytest.raises(ConfigError, match="holds out 0 of the 2"):
        parse_config({"data": {"public-labelled-size": 2}, "release": {"validation-fraction": 0.1}}, "x.toml")
    with pytest.raises(ConfigError, match="'release.ece-tolerance' = 2.0 must be"):
        parse_config({"release": {"ece-tolerance": 2.0}}, "x.toml")
    with pytest.raises(ConfigError, match="'scenario.shift-round' \\(9\\) must be <= 'rounds'"):
        parse_config({"rounds": 3, "scenario": {"shift-round": 9}}, "x.toml")
    flwr = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    default = parse_config({}, "defaults").to_flat()
    for key, value in default.items():
        if key.startswith(("release.", "drift.")) or key == "scenario.shift-round":
            assert flwr[key] == value, key
    parse_config(flwr, "pyproject.toml")


def test_releases_command_lists_the_history_and_fails_clearly_without_one(tmp_path):
    rel = _releaser(tmp_path)
    _consider(rel, 0, _trained(seed=0, epochs=3), 0.0)
    _consider(rel, 1, build_model("mlp", 8, 10, seed=99), 0.4)
    result = CliRunner().invoke(cli, ["releases", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "r0000*" in result.output and "rejected" in result.output and "r0001: regression" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["releases", str(empty)])
    assert result.exit_code == 2 and "has no release history" in result.output
