"""Device export: TorchScript matches fp32 eager predictions, int8 dynamic quantization keeps them
(agreement >= 95 %), metadata records size, latency and accuracy deltas; clear CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from feddistill.cli import cli
from feddistill.config import load_config
from feddistill.data.fleet import as_tensors, load_fleet
from feddistill.export import FP32_FILE, INT8_FILE, META_FILE, export_model
from feddistill.models import build_model
from feddistill.server.app import write_json
from feddistill.server.gate import Releaser
from feddistill.training import predict_logits, train_supervised

INT8_MIN_AGREEMENT = 0.95  # stated tolerance: int8 predictions agree with fp32 on >= 95 % of test inputs


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _digits(cfg):
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    x, y = as_tensors(fleet.splits.private_pool)
    test_x, _ = as_tensors(fleet.splits.test)
    return x, y, test_x, fleet.splits.test.y


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_torchscript_matches_fp32_and_int8_agrees(tmp_path, arch):
    cfg = load_config(None)
    x, y, test_x, test_y = _digits(cfg)
    model = build_model(arch, 8, 10, seed=0)
    train_supervised(model, x[:600], y[:600], epochs=4, batch_size=32, lr=0.05, seed=0)
    temperature = 1.7
    meta = export_model(model, temperature, test_x, test_y, tmp_path, metadata={"release": "r0001"}, latency_runs=20)

    eager = predict_logits(model, test_x).numpy() / temperature  # the calibrated fp32 reference
    scripted = torch.jit.load(str(tmp_path / FP32_FILE))
    with torch.no_grad():
        ts = scripted(test_x).numpy()
        q = torch.jit.load(str(tmp_path / INT8_FILE))(test_x).numpy()
    np.testing.assert_allclose(ts, eager, rtol=1e-5, atol=1e-5)
    agreement = float((q.argmax(1) == eager.argmax(1)).mean())
    assert agreement >= INT8_MIN_AGREEMENT

    on_disk = json.loads((tmp_path / META_FILE).read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert on_disk["release"] == "r0001" and on_disk["temperature"] == temperature
    fp32, int8 = on_disk["forms"]["fp32"], on_disk["forms"]["int8"]
    assert fp32["agreement_with_fp32"] == 1.0 and fp32["accuracy_delta_vs_fp32"] == 0.0
    assert int8["agreement_with_fp32"] == pytest.approx(agreement)
    assert int8["test_accuracy"] - on_disk["fp32_eager_test_accuracy"] == pytest.approx(int8["accuracy_delta_vs_fp32"])
    for form in (fp32, int8):
        assert form["bytes"] == (tmp_path / form["file"]).stat().st_size
        assert 0 < form["latency"]["p50_ms"] <= form["latency"]["p95_ms"]
        assert form["latency"]["batch_size"] == 1
    if arch == "mlp":  # all Linear: int8 weights make the file much smaller
        assert int8["bytes"] < 0.6 * fp32["bytes"]


def _run_with_releases(tmp_path):
    cfg = load_config(None, {"output_dir": str(tmp_path)})
    write_json(tmp_path / "config.json", cfg.to_dict())
    x, y, test_x, test_y = _digits(cfg)
    public = load_fleet(cfg.data, cfg.fleet, cfg.seed).splits.public_labelled  # validation: public labels only
    rel = Releaser(
        tmp_path,
        cfg,
        reference_digest="d" * 64,
        model_name="mlp",
        validation=(as_tensors(public)[0], public.y),
        reference_x=x[:300],
        test=(test_x, test_y),
    )
    build = lambda: build_model("mlp", 8, 10)  # noqa: E731
    signal = np.eye(10, dtype=np.float32)[y[:300].numpy()]
    good = build_model("mlp", 8, 10, seed=0)
    train_supervised(good, x[:600], y[:600], epochs=4, batch_size=32, lr=0.05, seed=0)
    for rnd, model in enumerate([good, build_model("mlp", 8, 10, seed=5)]):
        rel.consider(
            rnd, model, signal, test_metrics={"accuracy": 0.0}, client_epsilon=None, record_epsilon=None, build=build
        )
    assert rel.history.current == "r0000" and rel.history.get("r0001").status == "rejected"
    return tmp_path


def test_export_command_writes_the_release_and_refuses_unknown_or_rejected_ones(tmp_path):
    run = _run_with_releases(tmp_path / "run")
    runner = CliRunner()
    out = tmp_path / "device"
    result = runner.invoke(cli, ["export", str(run), "--release", "r0000", "--out", str(out), "--latency-runs", "10"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / META_FILE).read_text())
    assert meta["release"] == "r0000" and meta["config_digest"] == load_config(None, {"output_dir": str(run)}).digest()
    assert (out / FP32_FILE).is_file() and (out / INT8_FILE).is_file()
    assert meta["test_examples"] == 360 and "digits test split" in meta["test_split"]

    result = runner.invoke(cli, ["export", str(run), "--release", "r0042"])
    assert result.exit_code == 2 and "no release 'r0042'" in result.output and "released: r0000" in result.output
    result = runner.invoke(cli, ["export", str(run), "--release", "r0001"])
    assert result.exit_code == 2 and "gate rejected, never released" in result.output
    bare = tmp_path / "bare"
    bare.mkdir()
    result = runner.invoke(cli, ["export", str(bare), "--release", "r0000"])
    assert result.exit_code == 2 and "has no release history" in result.output
    result = runner.invoke(cli, ["export", str(tmp_path / "missing"), "--release", "r0000"])
    assert result.exit_code == 2 and "no such run folder" in result.output
