"""The server's public data: the public teacher, the release gate's validation split of the
labelled public sample, the reference rows whose labels are public, and the public-only control.

Everything here is public (the server owns it): private data never enters, and the test
split only measures.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from feddistill.config import RunConfig, validation_size
from feddistill.server.control import PublicLabels, public_control

log = logging.getLogger("feddistill")


def teacher_and_validation(cfg: RunConfig, splits):
    """The public teacher (trained on the labelled public sample minus the release gate's
    validation split, or loaded from the cache) and that validation split."""
    from feddistill.server.teacher import public_teacher  # keeps `flwr run` imports lean until needed

    size = validation_size(cfg) if cfg.release.validation_fraction else 0
    teacher_splits, validation = split_validation(splits, size, cfg.seed)
    return public_teacher(cfg.teacher, teacher_splits, cfg.seed), validation


def split_validation(splits, size: int, seed: int):
    """Hold `size` examples of the labelled public sample out of the public teacher's training:
    the release gate's and the temperature scaling's validation split. These labels are public
    (the server owns them) and held out from everything that trains, so the gate measures what
    the student learnt rather than what the teacher memorised; private data and the test split
    are never used for release decisions."""
    labelled = splits.public_labelled
    if size == 0:
        return splits, labelled.subset(np.zeros(0, dtype=np.int64))
    val_idx, teacher_idx = _validation_picks(len(labelled), size, seed)
    return dataclasses.replace(splits, public_labelled=labelled.subset(teacher_idx)), labelled.subset(val_idx)


def public_labels(cfg: RunConfig, splits) -> PublicLabels:
    """The reference rows the public teacher trained on, with their (public) labels: the
    labelled public sample minus the release gate's validation split."""
    size = validation_size(cfg) if cfg.release.validation_fraction else 0
    return _reference_rows(splits, _validation_picks(len(splits.public_labelled), size, cfg.seed)[1])


def validation_labels(cfg: RunConfig, splits) -> PublicLabels:
    """The release gate's validation rows in the reference set, with their (public) labels."""
    size = validation_size(cfg) if cfg.release.validation_fraction else 0
    return _reference_rows(splits, _validation_picks(len(splits.public_labelled), size, cfg.seed)[0])


def _reference_rows(splits, picks: np.ndarray) -> PublicLabels:
    """Picked positions of the labelled public sample as reference rows, with their labels."""
    positions = splits.source_indices["public_labelled"][picks]  # in the data set the splits were cut from
    reference = splits.source_indices["reference"]
    rows = np.minimum(np.searchsorted(reference, positions), len(reference) - 1)
    if not np.array_equal(reference[rows], positions):
        raise RuntimeError("the labelled public sample is not part of the reference set")
    return PublicLabels(rows=rows.astype(np.int64), labels=np.asarray(splits.public_labelled.y[picks], dtype=np.int64))


def _validation_picks(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions in the labelled public sample: (validation, the teacher's), both sorted."""
    picked = np.random.default_rng([seed, 0x7A11D]).permutation(n)
    return np.sort(picked[:size]), np.sort(picked[size:])


def public_control_of(
    cfg: RunConfig,
    build_student,
    teacher_signal: np.ndarray,
    ref_x,
    test_x,
    test_y: np.ndarray,
    rounds: int,
    public: PublicLabels,
) -> dict[str, Any]:
    """The public-only control of this run (same server pipeline, no fleet answers), cached."""
    from feddistill.server.teacher import cache_dir

    log.info("public-only control: the server pipeline without the fleet, %d rounds", rounds)
    control = public_control(cfg, build_student, teacher_signal, ref_x, test_x, test_y, rounds, cache_dir(), public)
    log.info("public-only control: test accuracy %.3f%s", control["accuracy"], " (cached)" if control["cached"] else "")
    return control
