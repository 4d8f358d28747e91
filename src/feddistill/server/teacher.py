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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from feddistill.atomic import atomic_path
from feddistill.config import TeacherConfig
from feddistill.data import Splits
from feddistill.models import build_model
from feddistill.simulations.fleet import as_tensors
from feddistill.training import Evaluation, evaluate_model, predict_probs, train_supervised

log = logging.getLogger("feddistill")


@dataclass
class PublicTeacher:
    model: torch.nn.Module
    reference_probs: np.ndarray  # (N_ref, C): round 0's teacher signal
    test: Evaluation  # public-teacher-only accuracy (the bar the federation must clear)


def cache_dir() -> Path:
    return Path(os.environ.get("FEDDISTILL_CACHE", Path.home() / ".cache" / "feddistill"))


def _cache_key(cfg: TeacherConfig, splits: Splits, seed: int) -> str:
    labelled = hashlib.sha256(np.ascontiguousarray(splits.public_labelled.x).tobytes()).hexdigest()
    blob = json.dumps(
        {"teacher": cfg.__dict__, "reference": splits.reference_digest, "labelled": labelled, "seed": seed, "v": 1},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def public_teacher(cfg: TeacherConfig, splits: Splits, seed: int) -> PublicTeacher:
    image_size, num_classes = int(splits.test.x.shape[-1]), splits.test.num_classes
    model = build_model(cfg.model, image_size, num_classes, seed=seed)
    path = cache_dir() / f"teacher-{_cache_key(cfg, splits, seed)}.pt"
    if path.is_file():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            log.info("public teacher: loaded from cache %s", path)
        except Exception as exc:  # a corrupt cache entry is retrained, never trusted
            log.warning("public teacher: ignoring unreadable cache %s (%s)", path, exc)
            path.unlink(missing_ok=True)
    if not path.is_file():
        x, y = as_tensors(splits.public_labelled)
        train_supervised(model, x, y, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed)
        with atomic_path(path) as tmp:
            torch.save(model.state_dict(), tmp)
    ref_x, _ = as_tensors(splits.reference)
    test_x, _ = as_tensors(splits.test)
    return PublicTeacher(
        model=model,
        reference_probs=predict_probs(model, ref_x).numpy(),
        test=evaluate_model(model, test_x, splits.test.y),
    )
