"""Benchmark splits: public labelled set, public reference set, private pool, test set.

Protocol
--------
* With an official test set (Fashion-MNIST): the reference set is the LAST
  ``reference_size`` training examples (``train[50000:60000]`` for 10000), the private
  pool is everything before it, and the labelled public set is a seeded random sample of
  ``public_labelled_size`` examples drawn from the reference set (public data whose labels
  are revealed only for those).
* Without one (digits): first a seeded, class-stratified test split of ``test_size``
  examples; then, from the seeded shuffle of the remainder, the first ``reference_size``
  examples form the reference set and the rest the private pool; the labelled public set
  is again a seeded sample of the reference set.

The reference set's labels are kept only for evaluation; training code must never read
``Splits.reference.y``. Everything is deterministic given ``seed``. Within each split the
examples are kept in ascending source-index order, so the reference digest depends only
on which examples were chosen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .datasets import ArrayDataset, DataError

__all__ = ["Splits", "reference_digest", "make_splits"]


@dataclass(frozen=True, eq=False)
class Splits:
    """The four data sets of one experiment plus the reference set's fingerprint.

    ``source_indices`` (an addition for bookkeeping/provenance) maps ``"public_labelled"``,
    ``"reference"``, ``"private_pool"`` and ``"test"`` to sorted int64 positions in the
    data set they were cut from: ``train`` for all four when no test set was given, and
    ``test`` itself for ``"test"`` otherwise.
    """

    public_labelled: ArrayDataset  # labelled public data for the public teacher
    reference: ArrayDataset  # public reference set; labels ONLY for evaluation
    private_pool: ArrayDataset  # partitioned over clients
    test: ArrayDataset
    reference_digest: str  # SHA-256 hex of reference.x bytes (C-contiguous float32)
    source_indices: dict[str, np.ndarray] = field(default_factory=dict)


def reference_digest(x: np.ndarray) -> str:
    """SHA-256 (hex) of ``x`` as C-contiguous float32 bytes; server and clients compare it
    to check they hold the same reference set."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()


def _check_sizes(n: int, *, reference_size: int, public_labelled_size: int, test_size: int, has_test: bool) -> None:
    if reference_size <= 0:
        raise DataError(f"reference_size must be positive, got {reference_size}")
    if public_labelled_size <= 0:
        raise DataError(f"public_labelled_size must be positive, got {public_labelled_size}")
    if public_labelled_size > reference_size:
        raise DataError(
            f"public_labelled_size ({public_labelled_size}) must be <= reference_size ({reference_size}): "
            "the labelled public set is drawn from the reference set"
        )
    if has_test and test_size != 0:
        # Silently ignoring it would hide a misconfiguration.
        raise DataError(
            f"test_size={test_size} is only used when no test set is given (digits); "
            "the data set's own test set is used as is, so pass test_size=0"
        )
    if not has_test and test_size <= 0:
        raise DataError(f"test_size must be positive when the data set has no test set, got {test_size}")
    used = reference_size + (0 if has_test else test_size)
    if used >= n:
        what = "reference_size" if has_test else "reference_size + test_size"
        raise DataError(
            f"{what} ({used}) must be < the {n} available training examples so that the private pool is non-empty"
        )


def _stratified_test_indices(y: np.ndarray, test_size: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``test_size`` indices with per-class counts proportional to class frequency
    (largest-remainder rounding), sampled uniformly within each class."""
    classes, counts = np.unique(y, return_counts=True)
    exact = test_size * counts / len(y)
    quota = np.floor(exact).astype(np.int64)
    # Hand the rounding remainder to the classes with the largest fractional parts
    # (stable sort: ties go to the lower class, so the result is deterministic).
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: test_size - int(quota.sum())]] += 1
    picked = [rng.choice(np.flatnonzero(y == c), size=int(q), replace=False) for c, q in zip(classes, quota) if q > 0]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _finish(
    source: ArrayDataset,
    test: ArrayDataset,
    ref_idx: np.ndarray,
    pool_idx: np.ndarray,
    test_idx: np.ndarray,
    public_labelled_size: int,
    rng: np.random.Generator,
) -> Splits:
    ref_idx = np.sort(ref_idx).astype(np.int64)
    pool_idx = np.sort(pool_idx).astype(np.int64)
    pub_idx = np.sort(rng.choice(ref_idx, size=public_labelled_size, replace=False)).astype(np.int64)
    reference = source.subset(ref_idx)
    return Splits(
        public_labelled=source.subset(pub_idx),
        reference=reference,
        private_pool=source.subset(pool_idx),
        test=test,
        reference_digest=reference_digest(reference.x),
        source_indices={
            "public_labelled": pub_idx,
            "reference": ref_idx,
            "private_pool": pool_idx,
            "test": np.sort(test_idx).astype(np.int64),
        },
    )


def make_splits(
    train: ArrayDataset,
    test: ArrayDataset | None,
    *,
    reference_size: int,
    public_labelled_size: int,
    test_size: int = 0,
    seed: int = 0,
) -> Splits:
    """Cut ``train`` (and ``test``) into the benchmark splits described in the module docstring."""
    n = len(train)
    _check_sizes(
        n,
        reference_size=reference_size,
        public_labelled_size=public_labelled_size,
        test_size=test_size,
        has_test=test is not None,
    )
    rng = np.random.default_rng(seed)
    if test is not None:
        # Fixed tail, independent of the seed, so every method sees the same reference set.
        ref_idx = np.arange(n - reference_size, n, dtype=np.int64)
        pool_idx = np.arange(0, n - reference_size, dtype=np.int64)
        test_idx = np.arange(len(test), dtype=np.int64)
        return _finish(train, test, ref_idx, pool_idx, test_idx, public_labelled_size, rng)

    test_idx = _stratified_test_indices(train.y, test_size, rng)
    rest = np.setdiff1d(np.arange(n, dtype=np.int64), test_idx, assume_unique=True)
    rest = rng.permutation(rest)
    ref_idx, pool_idx = rest[:reference_size], rest[reference_size:]
    return _finish(train, train.subset(test_idx), ref_idx, pool_idx, test_idx, public_labelled_size, rng)
