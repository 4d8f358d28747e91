"""The public-only control: the run's own server pipeline, without the fleet.

A federated student's accuracy means little on its own: the public data alone (the
public teacher's soft labels on the reference set, distilled for as many server epochs)
already gets most of the way. The control that counts is a student trained through
exactly the same server steps as the run — same public teacher signal, same student
architecture and initialisation, the same distillation step with the same seeds after
round 0 and after every round — with no fleet answers. Then

- ``private_gain = student − control`` (points of test accuracy the private data added),
- ``gap_closed = private_gain / (centralized − control)`` (the share of what pooling the
  private data would add that the federation recovered).

Both the run and its control call :func:`distil_step`, so they cannot drift apart. The
control's per-round accuracies are cached on disk, keyed by everything they depend on,
so repeated runs (seeds of a benchmark, resumed runs) train it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddistill.atomic import atomic_path
from feddistill.config import RunConfig
from feddistill.data.datasets import FLIP_KEEPS_CLASS
from feddistill.semisup import train_fixmatch
from feddistill.training import evaluate_model, train_distill

log = logging.getLogger("feddistill")

CACHE_VERSION = 3


@dataclass(frozen=True)
class PublicLabels:
    """Reference rows whose true label the server holds: the labelled public sample the public
    teacher trained on (drawn from the reference set; the release gate's validation rows are
    not among them)."""

    rows: np.ndarray  # int64 positions in the reference set
    labels: np.ndarray  # int64 class of each


def distil_step(
    student: torch.nn.Module,
    reference_x: torch.Tensor,
    signal: np.ndarray,
    cfg: RunConfig,
    seed: int,
    *,
    public: PublicLabels,
    fleet_rows: np.ndarray | None = None,
) -> None:
    """One server distillation step on the reference set, continuing from the student's weights
    (FedDF: Lin et al. 2020, "Ensemble Distillation for Robust Model Fusion in Federated
    Learning"), as ``distill.server-training`` says:

    - ``"kd"``: KD toward ``signal`` on every row at the KD temperature, ``distill.server-epochs``
      epochs;
    - ``"fixmatch"``: as many steps of FixMatch (Sohn et al. 2020). Labelled: the public labels
      (``public``) and the rows the fleet answered (``fleet_rows``, with ``signal`` as soft
      labels); unlabelled: every reference image. The control has no fleet rows, so it is
      FixMatch on the public data alone.
    """
    d = cfg.distill
    targets = torch.from_numpy(np.ascontiguousarray(signal, dtype=np.float32))
    if d.server_training == "fixmatch":
        rows, labelled_targets = _labelled(targets, public, fleet_rows)
        steps = d.server_epochs * math.ceil(len(reference_x) / d.batch_size)
        train_fixmatch(
            student,
            reference_x[rows],
            labelled_targets,
            reference_x,
            steps=steps,
            batch_size=d.batch_size,
            threshold=d.fixmatch_threshold,
            lr=d.server_lr,
            momentum=d.momentum,
            flip=FLIP_KEEPS_CLASS[cfg.data.dataset],
            seed=seed,
        )
        return
    train_distill(
        student,
        reference_x,
        targets,
        temperature=d.temperature,
        epochs=d.server_epochs,
        batch_size=d.batch_size,
        lr=d.server_lr,
        momentum=d.momentum,
        seed=seed,
    )


def _labelled(
    signal: torch.Tensor, public: PublicLabels, fleet_rows: np.ndarray | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and probability targets of FixMatch's labelled part: the fleet's answered rows with
    their signal, and the public labels (one-hot; they win where a row is both)."""
    fleet = np.setdiff1d(np.asarray(fleet_rows if fleet_rows is not None else [], dtype=np.int64), public.rows)
    rows = np.concatenate([np.asarray(public.rows, dtype=np.int64), fleet])
    one_hot = torch.nn.functional.one_hot(
        torch.from_numpy(np.asarray(public.labels, dtype=np.int64)), signal.shape[1]
    ).float()
    return torch.from_numpy(rows), torch.cat([one_hot, signal[torch.from_numpy(fleet)]])


def round_seed(cfg: RunConfig, rnd: int) -> int:
    """The seed of round ``rnd``'s distillation step (round 0: the public teacher alone)."""
    return cfg.seed + rnd


def _digest(a: np.ndarray | torch.Tensor) -> str:
    arr = a.numpy() if isinstance(a, torch.Tensor) else a
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def control_key(
    cfg: RunConfig,
    teacher_signal: np.ndarray,
    reference_x: torch.Tensor,
    test_x: torch.Tensor,
    rounds: int,
    public: PublicLabels,
) -> str:
    """Everything the control's accuracies depend on, hashed."""
    d = cfg.distill
    blob = json.dumps(
        {
            "v": CACHE_VERSION,
            "seed": cfg.seed,
            "rounds": rounds,
            "student": d.server_student,
            "schedule": [
                d.temperature,
                d.server_epochs,
                d.batch_size,
                d.server_lr,
                d.momentum,
                d.server_training,
                d.fixmatch_threshold,
                cfg.data.dataset,
            ],
            "signal": _digest(teacher_signal),
            "reference": _digest(reference_x),
            "test": _digest(test_x),
            "public": [
                _digest(np.asarray(public.rows, dtype=np.int64)),
                _digest(np.asarray(public.labels, dtype=np.int64)),
            ],
            "threads": torch.get_num_threads(),  # float reductions differ with the thread count
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def public_control(
    cfg: RunConfig,
    build_student: Callable[[], torch.nn.Module],
    teacher_signal: np.ndarray,
    reference_x: torch.Tensor,
    test_x: torch.Tensor,
    test_y: np.ndarray,
    rounds: int,
    cache: Path | None,
    public: PublicLabels,
) -> dict[str, Any]:
    """Test accuracy of the public-only control after round 0 and after each of ``rounds`` rounds.

    Returns ``{"accuracy": final, "nll": ..., "ece": ..., "per_round": [acc0, acc1, ...],
    "rounds": rounds, "cached": bool}``.
    """
    key = control_key(cfg, teacher_signal, reference_x, test_x, rounds, public)
    path = None if cache is None else cache / f"control-{key}.json"
    if path is not None and path.is_file():
        try:
            return {**json.loads(path.read_text()), "cached": True}
        except (OSError, ValueError) as exc:  # a corrupt cache entry is recomputed, never trusted
            log.warning("public-only control: ignoring unreadable cache %s (%s)", path, exc)
    student = build_student()
    per_round = []
    for rnd in range(rounds + 1):
        distil_step(student, reference_x, teacher_signal, cfg, round_seed(cfg, rnd), public=public)
        per_round.append(evaluate_model(student, test_x, test_y).accuracy)
    final = evaluate_model(student, test_x, test_y)
    result = {
        **final.to_dict(),
        "per_round": per_round,
        "rounds": rounds,
        "what": "the run's server pipeline (same teacher signal, student, seeds and schedule) with no fleet answers",
    }
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(result))
    return {**result, "cached": False}


def private_gain(student_accuracy: float, control_accuracy: float) -> float:
    """Points of test accuracy the private data added over the public-only control."""
    return 100.0 * (student_accuracy - control_accuracy)


def gap_closed(student_accuracy: float, control_accuracy: float, centralized_accuracy: float | None) -> float | None:
    """Share of the centralized student's lead over the control that the federation recovered
    (None without a centralized baseline, or when pooling adds nothing over the control)."""
    if centralized_accuracy is None or centralized_accuracy <= control_accuracy:
        return None
    return (student_accuracy - control_accuracy) / (centralized_accuracy - control_accuracy)
