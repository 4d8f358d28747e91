"""Audit targets, membership samples and reference (shadow) models (the attacks and their
scores, ``ATTACKS`` and ``attack_scores``, are :mod:`.attacks`'s, re-exported here).

The model side of the audit: everything that trains or queries a torch model lives
here, while the statistics come from the pure functions of :mod:`.metrics`,
:mod:`.attacks` and :mod:`.one_run`.

Membership ground truth (simulation only: the auditor knows the fleet)
----------------------------------------------------------------------
* Members of client ``pid``: ``fleet.private_data(pid)`` (canaries are audited separately).
  Members of the global student: the private data of every client that uploaded.
* Non-members and population data both come from the test split, which no model of the
  run trains on.  It is split once, class-stratified, into two halves: the *evaluation*
  half supplies non-member candidates, the *population* half trains the reference models
  and gives RMIA its population samples ``z``.  The reference set is not used: every
  client distils on it, so it is neither member nor non-member data.
* Dirichlet partitions make a client's members label-skewed.  Members and non-members
  are therefore matched per class (the same count of each class on both sides), so an
  attack that only detects "this class is frequent at the client" scores AUC 0.5.

Reference models (Carlini et al. 2022; Zarifzadeh et al. 2024)
---------------------------------------------------------------
The target points and the population form a pool; reference model ``k`` trains on the
pool points where ``in_mask[k]`` is set, and every pool point is IN for exactly
``K // 2`` of the ``K`` models, so online LiRA has IN and OUT models for every point and
offline LiRA / RMIA can use the ``K - K // 2`` OUT models of each point.
The auditor cannot replay the client's digest step (the teacher signal of each round is
not stored), so the client recipe is approximated by cross-entropy training with the
client's architecture, batch size, learning rate and momentum for
``revisit_epochs x rounds the client took part in`` epochs, on about as many points as
the target trained on.  For the uploads target each reference model's answers on the
client's queries are replayed through the run's upload mechanism (same bound, same
on-device noise, averaged over as many answers as the client gave) and mimicked exactly
as the real uploads are; for the global student each is distilled into the server
architecture on the reference set.  So IN/OUT distributions match what the attack sees.
Record-level DP-SGD is not replayed in the reference models (they train without it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from feddistill.models import build_model
from feddistill.privacy.mechanisms import bound_answers
from feddistill.training import predict_logits, predict_probs, train_distill, train_supervised

from .attacks import ATTACKS, attack_scores

__all__ = [
    "TrainRecipe",
    "TargetPoints",
    "split_test",
    "matched_members",
    "balanced_in_mask",
    "answers_to_probs",
    "mimic_from_answers",
    "replay_answers",
    "mean_per_query",
    "fit_reference",
    "probs_of",
    "attack_scores",
    "ATTACKS",
]


@dataclass(frozen=True)
class TrainRecipe:
    epochs: int
    batch_size: int
    lr: float
    momentum: float


@dataclass(frozen=True, eq=False)
class TargetPoints:
    """The candidate points of one target: members and matched non-members."""

    x: np.ndarray  # (N, 1, H, W)
    y: np.ndarray  # (N,)
    member: np.ndarray  # (N,) bool
    owner: np.ndarray  # (N,) client id of each member, -1 for non-members

    def __len__(self) -> int:
        return int(self.y.size)


def split_test(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class-stratified halves of the test split: (evaluation non-members, population)."""
    rng = np.random.default_rng([seed, 0x7E57])
    ev, pop = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        half = (idx.size + 1) // 2
        ev.append(idx[:half])
        pop.append(idx[half:])
    return np.sort(np.concatenate(ev)), np.sort(np.concatenate(pop))


def _largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    if counts.sum() <= total:
        return counts
    exact = counts * total / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: total - int(quota.sum())]] += 1
    return np.minimum(quota, counts)


def matched_members(
    member_y: np.ndarray, nonmember_y: np.ndarray, num_classes: int, max_per_side: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of members and non-members with the same count per class on both sides
    (at most ``max_per_side`` each, shared out over classes by largest remainder)."""
    cm = np.bincount(member_y, minlength=num_classes)
    cn = np.bincount(nonmember_y, minlength=num_classes)
    n = _largest_remainder(np.minimum(cm, cn), max_per_side)
    mem, non = [], []
    for c in range(num_classes):
        if n[c] == 0:
            continue
        mem.append(rng.choice(np.flatnonzero(member_y == c), size=int(n[c]), replace=False))
        non.append(rng.choice(np.flatnonzero(nonmember_y == c), size=int(n[c]), replace=False))
    if not mem:
        return np.array([], np.int64), np.array([], np.int64)
    return np.sort(np.concatenate(mem)), np.sort(np.concatenate(non))


def balanced_in_mask(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(k, n) bool: each column has exactly ``k // 2`` True entries, at random rows."""
    if k == 0:
        return np.zeros((0, n), bool)
    ranks = rng.random((k, n)).argsort(axis=0).argsort(axis=0)
    return ranks < k // 2


def answers_to_probs(answers: np.ndarray, kind: str = "probs") -> np.ndarray:
    """Turn uploaded rows into probability vectors: softmax for clipped logits; otherwise
    clip DP noise at 0 and renormalise (rows with nothing positive become uniform)."""
    a = np.asarray(answers, dtype=np.float64)
    if kind == "clipped_logits":
        a = a - a.max(axis=1, keepdims=True)
        e = np.exp(a)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    a = np.clip(np.nan_to_num(a, nan=0.0), 0.0, None)
    s = a.sum(axis=1, keepdims=True)
    uniform = np.full_like(a, 1.0 / a.shape[1])
    return np.where(s > 0, a / np.where(s > 0, s, 1.0), uniform).astype(np.float32)


def mean_per_query(queries: np.ndarray, answers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average the answers given to the same query over rounds.

    With temperature-1 distillation the loss is linear in the soft label, so training on
    the per-query mean is the same objective as training on every round's copy (up to
    batching); averaging first also averages out independent DP noise before it is
    clipped into a probability vector.  Returns ``(queries, mean answers, counts)``."""
    uq, inv = np.unique(queries, return_inverse=True)
    sums = np.zeros((uq.size, answers.shape[1]))
    np.add.at(sums, inv, answers)
    counts = np.bincount(inv, minlength=uq.size)
    return uq, (sums / counts[:, None]).astype(np.float32), counts


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def fit_reference(
    arch: str, image_size: int, num_classes: int, x: np.ndarray, y: np.ndarray, recipe: TrainRecipe, seed: int
) -> torch.nn.Module:
    """A reference model trained with the (approximated) client recipe."""
    model = build_model(arch, image_size, num_classes, seed=seed)
    train_supervised(
        model,
        _t(x),
        _t(y),
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        momentum=recipe.momentum,
        seed=seed,
    )
    return model


def mimic_from_answers(
    arch: str,
    image_size: int,
    num_classes: int,
    query_x: np.ndarray,
    soft: np.ndarray,
    recipe: TrainRecipe,
    seed: int,
    temperature: float = 1.0,
) -> torch.nn.Module:
    """Distil a model of ``arch`` from soft labels on the reference-set queries
    (the auditor's view of a client: Shi, Ouyang & Wang, PoPETs 2025)."""
    model = build_model(arch, image_size, num_classes, seed=seed)
    train_distill(
        model,
        _t(query_x),
        _t(soft.astype(np.float32)),
        temperature=temperature,
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        momentum=recipe.momentum,
        seed=seed,
    )
    return model


def replay_answers(
    model: torch.nn.Module,
    query_x: np.ndarray,
    counts: np.ndarray,
    *,
    bound: str,
    clip_norm: float,
    noise_std: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """What a client with ``model`` would have uploaded, averaged like the real uploads:
    its outputs bounded as the run bounds answers (``mechanisms.bound_answers``), plus the
    on-device Gaussian noise (std ``noise_std`` per entry, 0 when none) averaged over the
    ``counts[q]`` times query ``q`` was answered, as probabilities."""
    logits = predict_logits(model, _t(query_x)).numpy().astype(np.float64)
    answers = bound_answers(logits, bound, clip_norm=clip_norm).astype(np.float64)
    if noise_std > 0:
        answers = answers + rng.normal(size=answers.shape) * (noise_std / np.sqrt(counts))[:, None]
    return answers_to_probs(answers, bound)


def probs_of(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """Class probabilities in eval mode (float64 for the statistics)."""
    return predict_probs(model, _t(x)).numpy().astype(np.float64)
