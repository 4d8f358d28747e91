"""`feddistill audit RUN_DIR`: the membership-inference and DP-claim audit of a finished run.

Targets (docs/design.md, "Membership-inference audit")
------------------------------------------------------
(a) ``uploads_client{pid}``: what left the device.  The auditor sees what the server saw:
    it distils a mimic model from the client's answers on the reference-set queries and
    attacks the mimic; the reference models go through the same mimicry, which makes
    LiRA on the mimic the distillation-based LiRA of Shi, Ouyang & Wang, "Unveiling
    Client Privacy Leakage from Public Dataset Usage in Federated Distillation", PoPETs 2025.
(b) ``local_client{pid}``: the client's final local student.
(c) ``global``: the released global student (members: private data of every client that uploaded).

Attacks: loss threshold (Yeom et al. 2018), LiRA offline/online (Carlini et al. 2022),
RMIA online/offline (Zarifzadeh et al. 2024).  Metrics: ROC AUC, TPR at 10/1/0.1 % FPR
with Clopper-Pearson intervals, membership advantage, and an empirical epsilon lower
bound whose attack and threshold are both chosen on a held-out *fit* split and whose
bound is computed on the *evaluation* split (Jagielski et al. 2020; Nasr et al. 2021).

DP-claim audit: the canaries of the one-run audit (Steinke, Nasr & Jagielski 2023) are
scored by the negative loss of the canary client's local student, of the mimic of its
uploads, and of the global student.  Every empirical lower bound is compared with the
claimed epsilon that applies to one record of that target; a lower bound above the
claim is a DP VIOLATION and fails the audit (``fail_on_dp_violation``, on by default).

All lower bounds of one audit hold *jointly* at confidence ``1 - alpha``: each is
computed at ``alpha / n`` for the ``n`` bounds the audit reports (Bonferroni), so a
run with several targets does not raise false violations by multiple testing.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from feddistill.console import ProgressTask, progress
from feddistill.models import build_model
from feddistill.privacy.plan import UploadPrivacy
from feddistill.runfolder import AUDIT_JSON, AUDIT_MARKDOWN, RunFolder

from .artifacts import AuditInputError, RunArtifacts, load_run
from .attacks import loss_scores
from .label_inference import estimate_label_histogram, kl_divergence, tv_distance
from .metrics import empirical_epsilon, roc, slices, summarize_attack
from .one_run import audit_canaries
from .policy import evaluate_policy, load_policy
from .report import sanitize, write_json, write_report, write_roc_plots
from .targets import (
    ATTACKS,
    TargetPoints,
    TrainRecipe,
    answers_to_probs,
    attack_scores,
    balanced_in_mask,
    fit_reference,
    matched_members,
    mean_per_query,
    mimic_from_answers,
    probs_of,
    replay_answers,
    split_test,
)

__all__ = ["AuditInputError", "AuditOptions", "RunArtifacts", "load_run", "run_audit", "main", "claims_for_targets"]

MIN_PER_SIDE = 4  # fewer class-matched members (or non-members) than this: the target is skipped


@dataclass(frozen=True)
class AuditOptions:
    """How hard the auditor works.  The defaults audit the digits quick start in well
    under a minute on two CPU cores; raise ``reference_models`` (LiRA's per-example
    variances pay off from ~64) and ``max_points`` for a publication-grade audit."""

    reference_models: int = 4  # K reference (shadow) models per target; each point IN for K // 2
    target_clients: int = 2  # clients audited as targets (a) and (b); the canary client first
    max_points: int = 500  # candidate points per target (members + non-members), and population cap
    seed: int = 0
    fit_fraction: float = 0.5  # share of candidates that choose the attack and threshold for epsilon
    mimic_epochs: int = 20  # distillation epochs of every mimic model (target (a))
    max_reference_epochs: int = 100  # cap on a reference model's training epochs
    max_queries: int = 2000  # cap on distinct reference-set queries a mimic trains on
    alpha: float = 0.05  # 1 - joint confidence of all epsilon lower bounds
    default_delta: float = 1e-5  # delta for empirical epsilon where the run claims no DP

    def check(self) -> None:
        problems = []
        if self.reference_models < 0:
            problems.append("reference_models must be >= 0")
        if self.target_clients < 0:
            problems.append("target_clients must be >= 0")
        if self.max_points < 4 * MIN_PER_SIDE:
            problems.append(f"max_points must be >= {4 * MIN_PER_SIDE}")
        if not 0.0 < self.fit_fraction < 1.0:
            problems.append("fit_fraction must be in (0, 1)")
        if self.mimic_epochs < 1 or self.max_reference_epochs < 1 or self.max_queries < 1:
            problems.append("mimic_epochs, max_reference_epochs and max_queries must be >= 1")
        if not 0.0 < self.alpha < 1.0 or not 0.0 <= self.default_delta < 1.0:
            problems.append("alpha must be in (0, 1) and default_delta in [0, 1)")
        if problems:
            raise AuditInputError("invalid audit options: " + "; ".join(problems))


# --------------------------------------------------------------------------- claims
def _record_equivalent(claim: dict[str, Any], unit: str) -> dict[str, Any]:
    """The (epsilon, delta) a claim gives one *record*.

    Record-level claims apply as they are.  A client-level claim under replace-one
    applies too (changing a record replaces the client's data set).  Under add/remove
    (the default when the claim does not say), changing a record is a remove and an add
    of that client, so group privacy gives (2 eps, (1 + e^eps) delta) (Dwork & Roth 2014,
    Thm. 2.2 and its approximate-DP form)."""
    eps, delta = float(claim["epsilon"]), float(claim["delta"])
    out = {
        "epsilon": eps,
        "delta": delta,
        "unit": claim.get("unit", "record" if unit == "record_level" else "client"),
        "mechanism": claim.get("mechanism", "unspecified"),
        "accountant": claim.get("accountant", "unspecified"),
        "neighbouring": claim.get("neighbouring", "add/remove"),
        "source": f"privacy.{unit}",
        "epsilon_is": claim.get("epsilon_is"),
        "derivation": "as claimed",
    }
    if unit == "client_level" and out["neighbouring"] != "replace-one":
        out["epsilon"] = 2.0 * eps
        out["delta"] = min(1.0, delta * (1.0 + math.exp(min(eps, 700.0))))
        out["derivation"] = (
            f"client-level ({eps:g}, {delta:g})-DP under add/remove: a changed record is one client removed "
            "and one added, so group privacy gives (2 eps, (1 + e^eps) delta) per record"
        )
    return out


def _noise_is_local(claim: dict[str, Any]) -> bool:
    where = str(claim.get("placement", claim.get("noise_placement", ""))).lower()
    return where in {"local", "device", "client", "reply"}


def _device_claim(rec: dict[str, Any], client: int) -> dict[str, Any]:
    """Each device accounts its own DP-SGD: use client ``client``'s epsilon where the run
    reports it (``record_level.devices[pid]["record-epsilon"]``); the top-level epsilon is
    the largest over devices, which would be lenient for one client."""
    dev = (rec.get("devices") or {}).get(str(client))
    eps = dev.get("record-epsilon") if isinstance(dev, dict) else None
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        return rec
    return {**rec, "epsilon": float(eps), "epsilon_is": f"client {client}'s own device accountant"}


def claims_for_targets(
    privacy: dict[str, dict[str, Any] | None], client: int | None = None, local_noise: bool | None = None
) -> dict[str, dict[str, Any] | None]:
    """The smallest claimed epsilon that protects one record of each target kind.

    * ``local`` (b): only record-level DP (DP-SGD) protects a client's own student.
    * ``uploads`` (a): record-level DP (uploads are post-processing), and client-level DP
      when its noise is added on the device (``local_noise``; by default read from the
      claim's ``placement``); noise added to the *sum* at the server does not protect what
      the server received.
    * ``global`` (c): record-level DP and client-level DP wherever its noise is added (the
      global student is post-processing of the noisy aggregate).

    ``client``: the record's owner, whose own device epsilon applies (None: a record of
    any client, so the largest device epsilon).
    """
    rec = privacy.get("record_level")
    cli = privacy.get("client_level")
    if rec and client is not None:
        rec = _device_claim(rec, client)
    if local_noise is None:
        local_noise = _noise_is_local(cli) if cli else False
    r = _record_equivalent(rec, "record_level") if rec else None
    c = _record_equivalent(cli, "client_level") if cli else None

    def smallest(*cands: dict[str, Any] | None) -> dict[str, Any] | None:
        cands_ = [x for x in cands if x is not None]
        return min(cands_, key=lambda x: x["epsilon"]) if cands_ else None

    return {
        "local": r,
        "uploads": smallest(r, c if local_noise else None),
        "global": smallest(r, c),
    }


# --------------------------------------------------------------------------- evaluation
def _fit_split(member: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the fit split, stratified by membership (each side keeps >= 1 of each)."""
    fit = np.zeros(member.size, bool)
    for side in (True, False):
        idx = rng.permutation(np.flatnonzero(member == side))
        k = int(round(fraction * idx.size))
        k = min(max(k, 1), idx.size - 1)
        fit[idx[:k]] = True
    return fit


def _finite(scores: np.ndarray) -> np.ndarray:
    """Scores as finite floats (a NaN, e.g. from a degenerate reference fit, counts as least member-like)."""
    return np.nan_to_num(np.asarray(scores, dtype=float), nan=-1e300, posinf=1e300, neginf=-1e300)


def _evaluate(
    scores: dict[str, np.ndarray],
    skipped: dict[str, str],
    points: TargetPoints,
    delta: float,
    alpha_each: float,
    fit_fraction: float,
    rng: np.random.Generator,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    m = points.member
    fit = _fit_split(m, fit_fraction, rng)
    attacks: dict[str, Any] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in ATTACKS:
        if name not in scores:
            continue
        s = _finite(scores[name])
        summary = summarize_attack(s, m)
        eps = empirical_epsilon(s[fit], m[fit], s[~fit], m[~fit], delta, alpha_each)
        fpr, tpr, _ = roc(s, m)
        curves[name] = (fpr, tpr)
        attacks[name] = {"summary": summary, "empirical_epsilon": eps}
    # the headline attack is chosen on the fit split only, so its evaluation bound stays valid
    best = max(attacks, key=lambda a: (attacks[a]["empirical_epsilon"]["epsilon_lower_bound_fit"], -ATTACKS.index(a)))
    best_scores = _finite(scores[best])
    out = {
        "n_members": int(m.sum()),
        "n_nonmembers": int((~m).sum()),
        "n_fit": int(fit.sum()),
        "n_eval": int((~fit).sum()),
        "attacks": attacks,
        "skipped_attacks": skipped,
        "best_attack": best,
        "best_auc_attack": max(attacks, key=lambda a: attacks[a]["summary"]["auc"]),
        "epsilon_lower_bound": attacks[best]["empirical_epsilon"]["epsilon_lower_bound"],
        "max_certifiable_epsilon": attacks[best]["empirical_epsilon"]["max_certifiable_epsilon"],
        "per_class": {str(k): v for k, v in slices(best_scores, m, points.y).items()},
    }
    return out, curves


def _per_client(scores: np.ndarray, points: TargetPoints) -> dict[str, Any]:
    """Members of each client against all non-members (for the global student)."""
    out: dict[str, Any] = {}
    non = ~points.member
    for pid in np.unique(points.owner[points.member]):
        sel = (points.owner == pid) | non
        out[str(int(pid))] = summarize_attack(scores[sel], points.member[sel])
    return out


# --------------------------------------------------------------------------- the audit
@dataclass
class _Context:
    art: RunArtifacts
    options: AuditOptions
    rng: np.random.Generator
    ev_idx: np.ndarray  # test-split positions of non-member candidates
    pop_idx: np.ndarray  # test-split positions of population data
    plan: UploadPrivacy  # the run's upload mechanism (its privacy plan)

    @property
    def fleet(self):
        return self.art.fleet

    def model(self, arch: str, state: dict) -> Any:
        m = build_model(arch, self.fleet.image_size, self.fleet.num_classes)
        m.load_state_dict(state)
        m.eval()
        return m


def _candidates(ctx: _Context, member_x: np.ndarray, member_y: np.ndarray, owner: np.ndarray) -> TargetPoints | None:
    test = ctx.fleet.splits.test
    ev_y = test.y[ctx.ev_idx]
    mpos, npos = matched_members(member_y, ev_y, ctx.fleet.num_classes, ctx.options.max_points // 2, ctx.rng)
    if mpos.size < MIN_PER_SIDE:
        return None
    nidx = ctx.ev_idx[npos]
    return TargetPoints(
        x=np.concatenate([member_x[mpos], test.x[nidx]]),
        y=np.concatenate([member_y[mpos], test.y[nidx]]),
        member=np.r_[np.ones(mpos.size, bool), np.zeros(npos.size, bool)],
        owner=np.r_[owner[mpos], np.full(npos.size, -1)],
    )


def _population(ctx: _Context) -> tuple[np.ndarray, np.ndarray]:
    test = ctx.fleet.splits.test
    idx = ctx.rng.permutation(ctx.pop_idx)[: ctx.options.max_points]  # random order: the pool takes a prefix
    return test.x[idx], test.y[idx]


def _reference_models(
    ctx: _Context,
    arch: str,
    points: TargetPoints,
    pop: tuple[np.ndarray, np.ndarray],
    recipe: TrainRecipe,
    seed: int,
    n_train: int,
) -> tuple[list[Any], np.ndarray]:
    """K reference models on random halves of candidates + population.

    The pool takes only as many population points as make a half about ``n_train`` (the
    target's training-set size): how much a model overfits depends on how much data it
    has, so the reference models should see as much as the target did.  Population
    points left out of the pool are OUT for every reference model (they still serve as
    RMIA's population ``z``).  Returns the models and the (K, N + Z) IN mask."""
    n = len(points)
    n_pop = int(np.clip(2 * n_train - n, 0, pop[1].size))
    pool_x = np.concatenate([points.x, pop[0][:n_pop]])
    pool_y = np.concatenate([points.y, pop[1][:n_pop]])
    k = ctx.options.reference_models
    mask = np.zeros((k, n + pop[1].size), bool)
    mask[:, : n + n_pop] = balanced_in_mask(k, n + n_pop, ctx.rng)
    models = [
        fit_reference(
            arch,
            ctx.fleet.image_size,
            ctx.fleet.num_classes,
            pool_x[mask[i, : n + n_pop]],
            pool_y[mask[i, : n + n_pop]],
            recipe,
            seed=seed + 7919 * (i + 1),
        )
        for i in range(k)
    ]
    return models, mask


def _probs_pair(model: Any, points: TargetPoints, pop_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return probs_of(model, points.x), probs_of(model, pop_x)


def _stack(pairs: list[tuple[np.ndarray, np.ndarray]], n: int, z: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    if not pairs:
        return np.zeros((0, n, c)), np.zeros((0, z, c))
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _client_recipe(ctx: _Context, rounds_taken: int) -> TrainRecipe:
    d = ctx.art.cfg.distill
    epochs = min(ctx.options.max_reference_epochs, max(1, d.revisit_epochs * max(1, rounds_taken)))
    return TrainRecipe(epochs=epochs, batch_size=d.batch_size, lr=d.lr, momentum=d.momentum)


def _mimic_recipe(ctx: _Context) -> TrainRecipe:
    d = ctx.art.cfg.distill
    return TrainRecipe(epochs=ctx.options.mimic_epochs, batch_size=d.batch_size, lr=d.lr, momentum=d.momentum)


def _upload_queries(ctx: _Context, pid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct queries the client answered, its mean answer on each (as probabilities)
    and how often it answered each."""
    q, a = ctx.art.uploads[pid].stacked()
    uq, mean, counts = mean_per_query(q, a)
    soft = answers_to_probs(mean, ctx.plan.bound)
    if uq.size > ctx.options.max_queries:
        keep = np.sort(ctx.rng.choice(uq.size, ctx.options.max_queries, replace=False))
        uq, soft, counts = uq[keep], soft[keep], counts[keep]
    return uq, soft, counts


def _audit_client(ctx: _Context, pid: int, recipe_seed: int) -> dict[str, Any]:
    """Targets (a) and (b) of one client: shared candidates and reference models."""
    fleet, cfg = ctx.fleet, ctx.art.cfg
    arch, state = ctx.art.client_students[pid]
    data = fleet.private_data(pid)
    points = _candidates(ctx, data.x, data.y, np.full(len(data), pid))
    if points is None:
        return {"skipped": f"fewer than {MIN_PER_SIDE} class-matched members of client {pid}"}
    pop_x, pop_y = _population(ctx)
    taken = len(ctx.art.uploads[pid].rounds) if pid in ctx.art.uploads else cfg.rounds
    recipe = _client_recipe(ctx, taken)
    n_train = len(data)
    if ctx.art.canaries is not None and ctx.art.canaries.client == pid:
        n_train += int(ctx.art.canaries.included.sum())  # the target also trained on its included canaries
    refs, mask = _reference_models(ctx, arch, points, (pop_x, pop_y), recipe, recipe_seed, n_train)
    n, z, c = len(points), pop_y.size, fleet.num_classes
    mask_x, mask_z = mask[:, :n], mask[:, n:]
    out: dict[str, Any] = {"points": points, "pop_y": pop_y, "mask": (mask_x, mask_z), "recipe": recipe}

    local = ctx.model(arch, state)
    tx, tz = _probs_pair(local, points, pop_x)
    rx, rz = _stack([_probs_pair(r, points, pop_x) for r in refs], n, z, c)
    out["local"] = (tx, tz, rx, rz)

    if pid in ctx.art.uploads:
        uq, soft, counts = _upload_queries(ctx, pid)
        qx = fleet.splits.reference.x[uq]
        mrec = _mimic_recipe(ctx)
        mimic = mimic_from_answers(arch, fleet.image_size, c, qx, soft, mrec, seed=recipe_seed + 1)
        out["mimic"] = mimic
        tx, tz = _probs_pair(mimic, points, pop_x)
        pairs = []
        for k, r in enumerate(refs):
            noise = ctx.plan.noise_std if ctx.plan.mode == "local" else 0.0  # noise added on the device
            answers = replay_answers(
                r, qx, counts, bound=ctx.plan.bound, clip_norm=ctx.plan.clip_norm, noise_std=noise, rng=ctx.rng
            )
            mk = mimic_from_answers(arch, fleet.image_size, c, qx, answers, mrec, seed=recipe_seed + 104_729 * (k + 1))
            pairs.append(_probs_pair(mk, points, pop_x))
        rx, rz = _stack(pairs, n, z, c)
        out["uploads"] = (tx, tz, rx, rz)
        out["n_queries"] = int(uq.size)
        out["rounds"] = list(ctx.art.uploads[pid].rounds)
    return out


def _audit_global(ctx: _Context, seed: int) -> dict[str, Any]:
    fleet, cfg = ctx.fleet, ctx.art.cfg
    parts = ctx.art.participants
    xs = [fleet.private_data(p) for p in parts]
    member_x = np.concatenate([d.x for d in xs])
    member_y = np.concatenate([d.y for d in xs])
    owner = np.concatenate([np.full(len(d), p) for d, p in zip(xs, parts)])
    points = _candidates(ctx, member_x, member_y, owner)
    if points is None:
        return {"skipped": f"fewer than {MIN_PER_SIDE} class-matched members of the global student"}
    pop_x, pop_y = _population(ctx)
    client_arch = Counter(ctx.art.client_students[p][0] for p in parts).most_common(1)[0][0]
    taken = np.mean([len(ctx.art.uploads[p].rounds) for p in parts])
    recipe = _client_recipe(ctx, int(round(taken)))
    refs, mask = _reference_models(ctx, client_arch, points, (pop_x, pop_y), recipe, seed, member_y.size)
    n, z, c = len(points), pop_y.size, fleet.num_classes
    server_arch, state = ctx.art.global_student
    d = cfg.distill
    ref_x = fleet.splits.reference.x
    if len(ref_x) > ctx.options.max_queries:
        ref_x = ref_x[np.sort(ctx.rng.choice(len(ref_x), ctx.options.max_queries, replace=False))]
    srec = TrainRecipe(
        epochs=min(ctx.options.max_reference_epochs, max(1, d.server_epochs * cfg.rounds)),
        batch_size=d.batch_size,
        lr=d.server_lr,
        momentum=d.momentum,
    )
    pairs = []
    for k, r in enumerate(refs):
        student = mimic_from_answers(
            server_arch,
            fleet.image_size,
            c,
            ref_x,
            probs_of(r, ref_x).astype(np.float32),
            srec,
            seed=seed + 15_485_863 * (k + 1),
            temperature=d.temperature,
        )
        pairs.append(_probs_pair(student, points, pop_x))
    target = ctx.model(server_arch, state)
    tx, tz = _probs_pair(target, points, pop_x)
    rx, rz = _stack(pairs, n, z, c)
    return {
        "points": points,
        "pop_y": pop_y,
        "mask": (mask[:, :n], mask[:, n:]),
        "global": (tx, tz, rx, rz),
        "recipe": recipe,
        "server_recipe": srec,
        "model": target,
    }


def _label_inference(ctx: _Context) -> dict[str, Any]:
    """Label-distribution inference from uploads (Shi, Ouyang & Wang, PoPETs 2025)."""
    fleet = ctx.fleet
    c = fleet.num_classes
    uniform = np.full(c, 1.0 / c)
    prior = np.bincount(fleet.splits.private_pool.y, minlength=c) / len(fleet.splits.private_pool)
    clients: dict[str, Any] = {}
    for pid, up in ctx.art.uploads.items():
        _, answers = up.stacked()
        if ctx.plan.bound == "clipped_logits":
            answers = answers_to_probs(answers, ctx.plan.bound)
        est = estimate_label_histogram(answers)
        y = fleet.private_data(pid).y
        if y.size == 0:
            continue
        true = np.bincount(y, minlength=c) / y.size
        clients[str(pid)] = {
            "n_private": int(y.size),
            "n_answers": int(answers.shape[0]),
            "estimate": est.tolist(),
            "true": true.tolist(),
            "tv": tv_distance(true, est),
            "kl": kl_divergence(true, est),
            "tv_uniform_guess": tv_distance(true, uniform),
            "tv_population_prior": tv_distance(true, prior),
        }
    rows = list(clients.values())
    summary = {}
    if rows:
        summary = {
            "mean_tv": float(np.mean([r["tv"] for r in rows])),
            "mean_tv_uniform_guess": float(np.mean([r["tv_uniform_guess"] for r in rows])),
            "mean_tv_population_prior": float(np.mean([r["tv_population_prior"] for r in rows])),
            "clients_better_than_uniform": int(sum(r["tv"] < r["tv_uniform_guess"] for r in rows)),
            "clients_better_than_prior": int(sum(r["tv"] < r["tv_population_prior"] for r in rows)),
            "n_clients": len(rows),
        }
    return {
        "method": "column mean of the uploaded answers, clipped at 0 and normalised (Shi et al. 2025)",
        "baselines": "uniform guess; population prior (label mix of the whole private pool)",
        "summary": summary,
        "clients": clients,
    }


def _canary_rows(ctx: _Context, models: dict[str, Any], claims: dict[str, Any], alpha_each: float) -> dict[str, Any]:
    can = ctx.art.canaries
    assert can is not None
    out: dict[str, Any] = {
        "m": int(can.y.size),
        "n_included": int(can.included.sum()),
        "client": int(can.client),
        "score": "negative cross-entropy loss of the target model (eval mode)",
        "method": "Steinke, Nasr & Jagielski 2023 one-run audit",
        "results": {},
    }
    for kind, model in models.items():
        claim = claims[kind]
        delta = claim["delta"] if claim else ctx.options.default_delta
        s = loss_scores(probs_of(model, can.x), can.y)
        res = audit_canaries(s, can.included, delta=delta, beta=alpha_each)
        res.pop("guesses", None)
        res["claimed"] = claim
        res["violation"] = bool(claim is not None and res["epsilon_lower_bound"] > claim["epsilon"])
        out["results"][kind] = res
    return out


def _bound_entry(source: str, eps_lb: float, cap: float, claim: dict[str, Any] | None, delta: float) -> dict[str, Any]:
    return {
        "source": source,
        "epsilon_lower_bound": float(eps_lb),
        "max_certifiable_epsilon": float(cap),
        "delta": float(delta),
        "claimed_epsilon": None if claim is None else claim["epsilon"],
        "claimed_delta": None if claim is None else claim["delta"],
        "claim": claim,
        "violation": bool(claim is not None and eps_lb > claim["epsilon"]),
    }


def _select_clients(art: RunArtifacts, n: int) -> list[int]:
    cands = [p for p in art.participants if p in art.client_students]
    sizes = {p: len(art.fleet.parts[p]) for p in cands}
    canary = art.canaries.client if art.canaries is not None else None
    cands.sort(key=lambda p: (p != canary, -sizes[p], p))
    return cands[:n]


def run_audit(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    policy_path: str | Path | None = None,
    options: AuditOptions = AuditOptions(),
) -> tuple[dict[str, Any], int]:
    """Audit a finished run; write ``audit.json``, ``report.md`` and ``roc_<target>.png``
    to ``out_dir`` (default ``RUN_DIR/audit-report``).  Returns ``(audit, exit_code)``:
    0 when the policy passes, 1 when it fails.  Unreadable input raises
    :class:`AuditInputError` (exit code 2) before anything is trained.

    Torch runs single-threaded meanwhile: the audit trains many tiny models, which
    intra-op threads only slow down (by 10x and more on a busy 2-core laptop)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_audit(run_dir, out_dir, policy_path, options)
    finally:
        torch.set_num_threads(threads)


def _run_audit(
    run_dir: str | Path, out_dir: str | Path | None, policy_path: str | Path | None, options: AuditOptions
) -> tuple[dict[str, Any], int]:
    t_start = time.monotonic()
    policy, art, out = _audit_inputs(run_dir, out_dir, policy_path, options)
    run = _AuditRun(art, options)
    # one step per audited client, the global student, the canaries, and label inference + report
    steps = len(run.clients) + 1 + (art.canaries is not None) + 1
    with progress(f"audit of {Path(run_dir).name or run_dir}", steps, unit="steps", lines=0) as bar:
        run.audit_clients(bar)
        bar.phase("global student")
        run.audit_global()
        bar.advance()
        if art.canaries is not None:
            bar.phase(f"canaries (client {art.canaries.client})")
        canary = run.audit_canaries()
        if art.canaries is not None:
            bar.advance()
        bar.phase("label inference and report")
        t0 = time.monotonic()
        labels = _label_inference(run.ctx)
        run.timings["label_inference"] = time.monotonic() - t0

        audit = run.audit_record(run_dir, policy, canary, labels)
        rules, code = evaluate_policy(audit, policy)
        audit["verdict"] = {"passed": code == 0, "exit_code": code, "rules": rules}
        t0 = time.monotonic()
        plots = write_roc_plots(out, run.curves, run.targets)
        audit["plots"] = plots
        run.timings["report"] = time.monotonic() - t0
    run.timings["total"] = time.monotonic() - t_start
    audit["timings_s"] = run.timings
    audit = sanitize(audit)
    write_json(out / AUDIT_JSON, audit)
    write_report(out / AUDIT_MARKDOWN, audit)
    return audit, code


def _audit_inputs(
    run_dir: str | Path, out_dir: str | Path | None, policy_path: str | Path | None, options: AuditOptions
) -> tuple[Any, RunArtifacts, Path]:
    """The policy, the run's artefacts and the output folder, every one checked before anything trains."""
    if policy_path is not None and Path(policy_path).is_dir():  # not "not found": it is there, but a folder
        raise AuditInputError(f"{policy_path}: is a directory, not a policy file (TOML)")
    policy = load_policy(policy_path)
    options.check()
    art = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else RunFolder(Path(run_dir)).audit_report
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AuditInputError(f"{out}: cannot create the output directory ({exc})") from exc
    return policy, art, out


class _AuditRun:
    """One audit: its targets, ROC curves and epsilon lower bounds as they are found.

    The targets are audited in a fixed order (the clients, the global student, the canaries)
    that draws from the one generator ``rng`` in the same sequence every time."""

    def __init__(self, art: RunArtifacts, options: AuditOptions) -> None:
        self.art, self.options = art, options
        self.rng = np.random.default_rng([options.seed, 0xA0D17])
        ev_idx, pop_idx = split_test(art.fleet.splits.test.y, options.seed)
        self.plan = art.upload
        self.ctx = _Context(art, options, self.rng, ev_idx, pop_idx, self.plan)
        self.local_noise = self.plan.mode == "local" if self.plan.mode != "off" else None
        self.clients = _select_clients(art, options.target_clients)
        self.warnings = list(art.warnings)
        cli_claim = art.privacy.get("client_level")
        if cli_claim and not (self.local_noise or _noise_is_local(cli_claim)):
            self.warnings.append(
                "the client-level noise is not added on the device (the run's privacy.client-level is "
                f"{self.plan.mode!r}): the server saw un-noised replies, "
                "so that claim does not cover the uploads target"
            )
        self.claims_by_target: dict[str, dict[str, Any] | None] = {}
        self.n_bounds = 2 * len(self.clients) + 1 + (3 if art.canaries is not None else 0)
        self.alpha_each = options.alpha / self.n_bounds
        self.timings: dict[str, float] = {}
        self.targets: dict[str, Any] = {}
        self.curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        self.bounds: list[dict[str, Any]] = []
        self.mimics: dict[int, Any] = {}

    def add_target(
        self,
        name: str,
        kind: str,
        desc: str,
        probs: tuple,
        info: dict[str, Any],
        extra: dict[str, Any],
        owner: int | None,
    ) -> None:
        """Attack one target; keep its result, its ROC curves and its epsilon lower bound."""
        options = self.options
        claim = claims_for_targets(self.art.privacy, owner, self.local_noise)[kind]
        self.claims_by_target[name] = claim
        delta = claim["delta"] if claim else options.default_delta
        points: TargetPoints = info["points"]
        mx, mz = info["mask"]
        scores, skipped = attack_scores(probs[0], probs[1], probs[2], probs[3], points.y, info["pop_y"], mx, mz)
        res, cv = _evaluate(scores, skipped, points, delta, self.alpha_each, options.fit_fraction, self.rng)
        res.update({"kind": kind, "description": desc, "claimed": claim, "delta": delta, **extra})
        res["violation"] = bool(claim is not None and res["epsilon_lower_bound"] > claim["epsilon"])
        if kind == "global":
            best = _finite(scores[res["best_attack"]])
            res["per_client"] = _per_client(best, points)
        self.targets[name] = res
        self.curves[name] = cv
        ee = res["attacks"][res["best_attack"]]["empirical_epsilon"]
        self.bounds.append(
            _bound_entry(
                f"{name} (membership inference, {res['best_attack']})",
                ee["epsilon_lower_bound"],
                ee["max_certifiable_epsilon"],
                claim,
                delta,
            )
        )

    def audit_clients(self, bar: ProgressTask | None = None) -> None:
        """Targets (a) and (b) of every selected client: its uploads and its local student
        (``bar``: one step of it per client)."""
        for i, pid in enumerate(self.clients):
            if bar is not None:
                bar.phase(f"client {pid} (uploads, local student)")
            self.audit_client(i, pid)
            if bar is not None:
                bar.advance()

    def audit_client(self, i: int, pid: int) -> None:
        """Targets (a) and (b) of client ``pid``, the ``i``-th audited."""
        options = self.options
        t0 = time.monotonic()
        info = _audit_client(self.ctx, pid, recipe_seed=options.seed * 1_000_003 + 101 * (i + 1))
        if "skipped" in info:
            for kind in ("uploads", "local"):
                self.targets[f"{kind}_client{pid}"] = {"skipped": True, "reason": info["skipped"], "kind": kind}
            return
        common = {
            "client": pid,
            "architecture": self.art.client_students[pid][0],
            "reference_recipe": asdict(info["recipe"]),
            "reference_models": options.reference_models,
        }
        if "uploads" in info:
            self.mimics[pid] = info["mimic"]
            self.add_target(
                f"uploads_client{pid}",
                "uploads",
                f"(a) client {pid}'s uploads: mimic distilled from its answers on {info['n_queries']} reference-set "
                f"queries over rounds {info['rounds']}; "
                "reference models mimicked the same way (distillation-based LiRA)",
                info["uploads"],
                info,
                {**common, "mimic_recipe": asdict(_mimic_recipe(self.ctx)), "rounds": info["rounds"]},
                owner=pid,
            )
        self.add_target(
            f"local_client{pid}",
            "local",
            f"(b) client {pid}'s final local student",
            info["local"],
            info,
            common,
            owner=pid,
        )
        self.timings[f"client{pid}"] = time.monotonic() - t0

    def audit_global(self) -> None:
        """Target (c): the released global student; members are every uploader's private data."""
        art, options = self.art, self.options
        t0 = time.monotonic()
        ginfo = _audit_global(self.ctx, seed=options.seed * 1_000_003 + 99_991)
        if "skipped" in ginfo:
            self.targets["global"] = {"skipped": True, "reason": ginfo["skipped"], "kind": "global"}
        else:
            self.add_target(
                "global",
                "global",
                f"(c) the released global student; members: private data of the {len(art.participants)} "
                "clients that uploaded",
                ginfo["global"],
                ginfo,
                {
                    "architecture": art.global_student[0],
                    "reference_recipe": asdict(ginfo["recipe"]),
                    "reference_distillation": asdict(ginfo["server_recipe"]),
                    "reference_models": options.reference_models,
                },
                owner=None,
            )
        self.timings["global"] = time.monotonic() - t0

    def audit_canaries(self) -> dict[str, Any] | None:
        """The one-run canary audit of the canary client's local student, uploads and the global student."""
        art = self.art
        if art.canaries is None:
            return None
        t0 = time.monotonic()
        cpid = art.canaries.client
        models = {"local": self.ctx.model(*art.client_students[cpid])}
        if cpid in art.uploads:
            models["uploads"] = self._uploads_mimic(cpid)
        else:
            self.warnings.append(f"the canary client {cpid} uploaded nothing: no canary audit of its uploads")
        models["global"] = self.ctx.model(*art.global_student)
        canary = _canary_rows(
            self.ctx, models, claims_for_targets(art.privacy, cpid, self.local_noise), self.alpha_each
        )
        for kind, res in canary["results"].items():
            self.bounds.append(
                _bound_entry(
                    f"canaries vs {kind} (client {cpid}, one-run audit)",
                    res["epsilon_lower_bound"],
                    res["max_cap"],
                    res["claimed"],
                    res["delta"],
                )
            )
        self.timings["canaries"] = time.monotonic() - t0
        return canary

    def _uploads_mimic(self, pid: int) -> Any:
        """The mimic of `pid`'s uploads: the one its uploads target trained, or a new one."""
        if pid not in self.mimics:
            art = self.art
            uq, soft, _ = _upload_queries(self.ctx, pid)
            self.mimics[pid] = mimic_from_answers(
                art.client_students[pid][0],
                art.fleet.image_size,
                art.fleet.num_classes,
                art.fleet.splits.reference.x[uq],
                soft,
                _mimic_recipe(self.ctx),
                seed=self.options.seed * 1_000_003 + 17,
            )
        return self.mimics[pid]

    def audit_record(
        self, run_dir: str | Path, policy: Any, canary: dict[str, Any] | None, labels: dict[str, Any]
    ) -> dict[str, Any]:
        """audit.json without its verdict, plots and timings."""
        art, options = self.art, self.options
        return {
            "run_dir": str(Path(run_dir)),
            "config_digest": art.results.get("config_digest"),
            "reference_digest": art.fleet.splits.reference_digest,
            "options": asdict(options),
            "policy": policy.to_dict(),
            "privacy_claims": art.privacy,
            "claims_per_target": self.claims_by_target,
            "upload_mechanism": {
                "mode": self.plan.mode,
                "bound": self.plan.bound,
                "clip_norm": self.plan.clip_norm,
                "noise_std": self.plan.noise_std if self.plan.mode == "local" else 0.0,
            },
            "is_dp": art.is_dp,
            "target_clients": self.clients,
            "participants": art.participants,
            "confidence": {
                "alpha": options.alpha,
                "n_bounds": self.n_bounds,
                "alpha_per_bound": self.alpha_each,
                "note": "every epsilon lower bound holds at 1 - alpha/n_bounds, "
                "so all of them hold jointly at 1 - alpha",
            },
            "methodology": METHODOLOGY,
            "targets": self.targets,
            "canary_audit": canary,
            "label_inference": labels,
            "epsilon_lower_bounds": self.bounds,
            "dp_violations": [b for b in self.bounds if b["violation"]],
            "warnings": self.warnings,
        }


METHODOLOGY = {
    "members": "client pid: fleet.private_data(pid); global student: private data of every client that uploaded",
    "non_members": (
        "evaluation half of the test split (class-stratified halves; no model of the run trains on the test split); "
        "members and non-members are matched per class so label skew alone gives AUC 0.5"
    ),
    "population": "the other half of the test split: trains the reference models and is RMIA's population z",
    "reference_models": (
        "K models of the client's architecture trained with cross-entropy (the client's batch size, lr, momentum; "
        "revisit_epochs x rounds the client took part in epochs) on random halves of candidates + population, "
        "each point IN for exactly K//2 of them; for uploads each is then mimicked like the real uploads, for the "
        "global student distilled into the server architecture on the reference set. The digest step is not "
        "replayed (the per-round teacher signal is not stored), so this approximates the client pipeline."
    ),
    "mimic": "student of the client's architecture distilled (temperature 1) from the client's per-query mean answer",
    "epsilon": (
        "attack and threshold chosen on the fit split (largest Clopper-Pearson bound there), bound computed on the "
        "evaluation split; eps >= max(ln((TPR_lo - delta)/FPR_hi), ln((TNR_lo - delta)/FNR_hi))"
    ),
    "dp_violation": "an empirical lower bound above the smallest claimed epsilon "
    "that protects one record of the target",
    "delta": "the claimed delta of the target where the run is DP, otherwise options.default_delta",
}


def main(
    run_dir: str, policy: str | None = None, out: str | None = None, reference_models: int = 4, target_clients: int = 2
) -> int:
    """CLI entry point: run the audit, print the verdict, return the exit code
    (0 pass, 1 policy failed, 2 unreadable input / usage error)."""
    try:
        audit, code = run_audit(
            run_dir, out, policy, AuditOptions(reference_models=reference_models, target_clients=target_clients)
        )
    except AuditInputError as exc:
        print(f"feddistill audit: error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(out) if out is not None else RunFolder(Path(run_dir)).audit_report
    for name, t in audit["targets"].items():
        if t.get("skipped"):
            print(f"{name}: skipped ({t['reason']})")
            continue
        best = t["attacks"][t["best_auc_attack"]]["summary"]
        claim = t.get("claimed")
        claimed = f", claimed eps {claim['epsilon']:.3g}" if claim else ""
        print(
            f"{name}: AUC {best['auc']:.3f} ({t['best_auc_attack']}), TPR@0.1%FPR "
            f"{best['tpr_at_fpr']['0.001']['tpr']:.3f}, eps lower bound {t['epsilon_lower_bound']:.3f}{claimed}"
        )
    for r in audit["verdict"]["rules"]:
        print(f"VERDICT {'PASS' if r['passed'] else 'FAIL'} {r['rule']}: {r['detail']}")
    print(f"{'PASSED' if code == 0 else 'FAILED'}; report: {out_dir / AUDIT_MARKDOWN}")
    return code
