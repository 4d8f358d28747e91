"""Round 0: the public teacher and its soft labels on the reference set.

The teacher (a larger net than any student) is trained on the labelled public
sample only; it never sees private data. Its probabilities on the public
reference set are round 0's teacher signal. Both are cached on disk, keyed by
everything they depend on, so repeated runs skip the training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from feddistill.atomic import atomic_path
from feddistill.config import TeacherConfig
from feddistill.console import training_progress
from feddistill.data import Splits
from feddistill.data.fleet import as_tensors
from feddistill.models import build_model
from feddistill.training import Evaluation, evaluate_model, predict_probs, train_supervised

log = logging.getLogger("feddistill")


@dataclass
class PublicTeacher:
    model: torch.nn.Module
    reference_probs: np.ndarray  # (N_ref, C): round 0's teacher signal
    test: Evaluation  # public-teacher-only accuracy (the bar the federation must clear)


def cache_dir() -> Path:
    return Path(os.environ.get("FEDDISTILL_CACHE", Path.home() / ".cache" / "feddistill"))


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _cache_key(cfg: TeacherConfig, splits: Splits, seed: int) -> str:
    blob = json.dumps(
        {
            "teacher": cfg.__dict__,
            "reference": splits.reference_digest,
            "labelled": _digest(splits.public_labelled.x),
            "test": _digest(splits.test.x),
            "seed": seed,
            "v": 2,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def public_teacher(cfg: TeacherConfig, splits: Splits, seed: int) -> PublicTeacher:
    image_size, num_classes = int(splits.test.x.shape[-1]), splits.test.num_classes
    model = build_model(cfg.model, image_size, num_classes, seed=seed)
    path = cache_dir() / f"teacher-{_cache_key(cfg, splits, seed)}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            model.load_state_dict(cached["state"])
            log.info("public teacher: loaded from cache %s", path)
            return PublicTeacher(model, cached["reference_probs"].numpy(), Evaluation(**cached["test"]))
        except Exception as exc:  # a corrupt cache entry is retrained, never trusted
            log.warning("public teacher: ignoring unreadable cache %s (%s)", path, exc)
            path.unlink(missing_ok=True)
    x, y = as_tensors(splits.public_labelled)
    # minutes for a large teacher on Fashion-MNIST: a bar on a terminal, a few lines in a log
    with training_progress(
        model,
        f"public teacher ({cfg.model}, {len(x)} labelled)",
        epochs=cfg.epochs,
        rows=len(x),
        batch_size=cfg.batch_size,
    ):
        train_supervised(model, x, y, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)
    ref_x, _ = as_tensors(splits.reference)
    test_x, _ = as_tensors(splits.test)
    # the teacher's outputs are cached with its weights: inference with a large net on the
    # reference and test sets costs every run tens of CPU seconds (bench/results/profile)
    teacher = PublicTeacher(model, predict_probs(model, ref_x).numpy(), evaluate_model(model, test_x, splits.test.y))
    with atomic_path(path) as tmp:
        torch.save(
            {
                "state": model.state_dict(),
                "reference_probs": torch.from_numpy(teacher.reference_probs),
                "test": asdict(teacher.test),
            },
            tmp,
        )
    return teacher
