"""Device export of a released student: TorchScript (fp32) and int8 dynamic quantization.

``feddistill export RUN_DIR --release ID [--out DIR]`` writes to ``DIR`` (default
``RUN_DIR/exports/ID``)::

    student_fp32.torchscript.pt   TorchScript of the calibrated student (logits / T)
    student_int8.torchscript.pt   the same after int8 dynamic quantization of its Linear layers
    export.json                   release metadata, file sizes, CPU latency (batch 1, p50/p95),
                                  test accuracy of each form and its delta / agreement vs fp32

Both forms output calibrated logits: the release's temperature (fitted on the public
validation split) is folded into the exported module, so a device's softmax is the
calibrated one. Temperature scaling never changes an argmax, so accuracy is unaffected.
Dynamic quantization (``torch.ao.quantization.quantize_dynamic``) stores Linear weights
as int8 and quantizes activations on the fly; convolutions stay fp32.
"""

from __future__ import annotations

import platform
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from feddistill.atomic import atomic_path
from feddistill.atomic import write_json as _write_json
from feddistill.calibration import softmax
from feddistill.runfolder import EXPORT_FP32 as FP32_FILE
from feddistill.runfolder import EXPORT_INT8 as INT8_FILE
from feddistill.runfolder import EXPORT_META as META_FILE

__all__ = [
    "FP32_FILE",
    "INT8_FILE",
    "META_FILE",
    "CalibratedStudent",
    "export_model",
    "export_release",
    "latency_ms",
    "predict",
    "quantize_int8",
    "to_torchscript",
]


class CalibratedStudent(nn.Module):
    """A student whose logits are divided by the release's temperature."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) / self.temperature


@contextmanager
def _quiet() -> Iterator[None]:
    """torch 2.13 marks TorchScript and torch.ao quantization deprecated; they still are the
    formats a device runtime without Python loads, so keep the warnings out of the user's way."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
        yield


def quantize_int8(model: nn.Module) -> nn.Module:
    with _quiet():
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def to_torchscript(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with _quiet(), torch.no_grad():
        return torch.jit.trace(model.eval(), example)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


@torch.no_grad()
def latency_ms(model: nn.Module, example: torch.Tensor, runs: int = 200, warmup: int = 20) -> dict[str, float]:
    """CPU latency of one batch-1 forward pass on ONE thread: p50 / p95 / mean in milliseconds.

    One thread is what a device serving single requests uses, and it keeps the numbers
    meaningful on a busy machine: at batch 1 the quantized kernels' thread pool otherwise
    spends 1000x the compute waiting for cores."""
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(warmup):
            model(example)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(example)
            times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        torch.set_num_threads(threads)
    arr = np.asarray(times)
    return {
        "p50_ms": float(np.percentile(arr, 50)),
        "p95_ms": float(np.percentile(arr, 95)),
        "mean_ms": float(arr.mean()),
        "runs": runs,
        "batch_size": 1,
        "threads": 1,
    }


def export_model(
    model: nn.Module,
    temperature: float,
    test_x: torch.Tensor,
    test_y: np.ndarray,
    out_dir: Path,
    *,
    metadata: dict[str, Any] | None = None,
    latency_runs: int = 200,
) -> dict[str, Any]:
    """Export `model` (calibrated by `temperature`) to TorchScript fp32 and int8; measure and
    write ``export.json``. Returns that metadata."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = CalibratedStudent(model, temperature).eval()
    example = test_x[:1].clone()
    scripted = to_torchscript(fp32, example)
    int8 = to_torchscript(quantize_int8(fp32), example)
    files = {}
    for name, module in (("fp32", scripted), ("int8", int8)):
        path = out_dir / (FP32_FILE if name == "fp32" else INT8_FILE)
        with atomic_path(path) as tmp:
            module.save(str(tmp))
        files[name] = path
    # measure what was written: reload both files, as a device would
    with _quiet():
        loaded = {name: torch.jit.load(str(path)) for name, path in files.items()}
    reference = predict(fp32, test_x)
    ref_pred = reference.argmax(1)
    ref_acc = float((ref_pred == test_y).mean())
    forms: dict[str, Any] = {}
    for name, module in loaded.items():
        logits = predict(module, test_x)
        pred = logits.argmax(1)
        acc = float((pred == test_y).mean())
        forms[name] = {
            "file": files[name].name,
            "bytes": files[name].stat().st_size,
            "test_accuracy": acc,
            "accuracy_delta_vs_fp32": acc - ref_acc,
            "agreement_with_fp32": float((pred == ref_pred).mean()),
            "max_abs_prob_diff_vs_fp32": float(np.abs(softmax(logits) - softmax(reference)).max()),
            "latency": latency_ms(module, example, runs=latency_runs),
        }
    meta = {
        **(metadata or {}),
        "temperature": float(temperature),
        "input_shape": list(example.shape),
        "output": "calibrated logits (softmax gives calibrated probabilities)",
        "fp32_eager_test_accuracy": ref_acc,
        "test_examples": int(len(test_y)),
        "forms": forms,
        "size_ratio_int8_vs_fp32": forms["int8"]["bytes"] / forms["fp32"]["bytes"],
        "environment": {
            "torch": torch.__version__,
            "quantized_engine": torch.backends.quantized.engine,
            "machine": platform.machine(),
        },
    }
    _write_json(out_dir / META_FILE, meta)
    return meta


def export_release(run_dir: Path, rid: str, out_dir: Path | None = None, *, latency_runs: int = 200) -> dict[str, Any]:
    """Export release `rid` of a finished run (see the module docstring). Raises ReleaseError
    (unknown or rejected release, no history), ConfigError, DataError or RunFolderError (the
    export folder is a file or cannot be written) with a clear message."""
    from feddistill.data.fleet import as_tensors, load_fleet
    from feddistill.models import build_model
    from feddistill.runfolder import RunFolder, check_output_folder, model_of_blob
    from feddistill.server.gate import load_release_model
    from feddistill.simulations.run import resume_config

    run_dir = Path(run_dir)
    release, blob = load_release_model(run_dir, rid)
    saved = model_of_blob(blob, f"release {rid}")
    out = Path(out_dir) if out_dir is not None else RunFolder(run_dir).export(rid)
    check_output_folder(out)  # before the timing runs, not after them
    cfg = resume_config(run_dir)
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    model = build_model(saved.model, fleet.image_size, fleet.num_classes)
    model.load_state_dict(saved.state_dict)
    test_x, _ = as_tensors(fleet.splits.test)
    meta = {
        "release": release.id,
        "round": release.round,
        "parent": release.parent,
        "model": release.model,
        "reference_digest": release.reference_digest,
        "config_digest": release.config_digest,
        "client_epsilon": release.client_epsilon,
        "record_epsilon": release.record_epsilon,
        "test_split": f"{cfg.data.dataset} test split ({len(fleet.splits.test.y)} examples)",
    }
    return export_model(
        model,
        float(saved.metadata.get("temperature", 1.0)),
        test_x,
        fleet.splits.test.y,
        out,
        metadata=meta,
        latency_runs=latency_runs,
    )
