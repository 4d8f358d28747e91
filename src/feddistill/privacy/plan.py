"""A run's privacy plan: which mechanism protects the uploads, with which noise, and
what the accountant is told — derived once from the config, used by server and client.

Client-level DP of the uploads (unit: one client, add/remove neighbouring). A reply is
a (|Q|, C) matrix whose rows have L2 norm <= B (probabilities and votes: B = 1;
clipped logits: B = clip-norm), so one client changes the sum of replies by at most
Delta = B * sqrt(|Q|) (``mechanisms.reply_sensitivity``). Per mode:

- ``local``: every client adds N(0, (z Delta)^2) to its own reply. Each reply is a
  Gaussian mechanism on that client's data, and the server sees who replied, so no
  amplification by sampling is claimed: a client's epsilon composes its own
  participations (q = 1 per participation). Holds against the server.
- ``central``: the (trusted) server adds N(0, (z Delta)^2) to the sum of the replies of
  a Poisson(q) sample of clients: a Poisson-subsampled Gaussian per round (Abadi et al.
  2016; Mironov et al. 2019), composed over rounds. Holds for everything the server
  releases (teacher signals, students), not against the server.
- ``gnmax``: one-hot votes summed by the server plus N(0, (z Delta)^2) per count
  (Papernot et al. 2018), accounted like ``central`` (data-independent analysis).
- ``confident-gnmax``: the threshold check (z1) and the answer (z2) are both Gaussian
  mechanisms on the same sampled votes; together they are one Gaussian mechanism with
  1/z^2 = 1/z1^2 + 1/z2^2, accounted like ``central`` — data-independent, every query
  is charged whether or not it is answered.

With ``distill.secure-aggregation = "secagg+"``, ``central`` and ``gnmax`` become
*distributed*: every client adds a share of the noise and the server, which sees only
the sum, adds none. The accounting changes (replace-one, q = 1, δ minus the clipping
failure probability): see ``feddistill.privacy.distributed``.

Record-level DP (unit: one private example, add/remove): DP-SGD on every device
(``feddistill.privacy.dpsgd``) at a public Poisson rate q, ``revisit-epochs * int(1/q)``
steps per round, with z calibrated from (q, steps, planned participations): all public,
so the ε a device reports depends only on how often it took part.

Noise source (``privacy.noise-source``): every privacy-relevant random draw on a client
(local answer noise, DP-SGD's Poisson sampling and noise; SecAgg+ noise shares always use
OS entropy) is seeded from the run's seed only in a ``"seeded"`` simulation; a device
(node config ``data-dir``) always draws from OS entropy and refuses a seeded round, and
the server refuses to start a seeded run with devices.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from feddistill.config import ConfigError, RunConfig
from feddistill.privacy.mechanisms import reply_sensitivity, row_norm_bound
from feddistill.secagg_shares import CLIP_FAILURE_SHARE, SecAggNoise, run_shares

if TYPE_CHECKING:  # dp-accounting is imported only when an epsilon is computed
    from feddistill.privacy.accounting import GaussianEvent

ACCOUNTANT = "pld (dp-accounting), rdp cross-check"


def planned_participations(cfg: RunConfig) -> int:
    """Rounds a device plans to serve: the config's value, or about twice its expected share."""
    if cfg.privacy.record_participations:
        return cfg.privacy.record_participations
    return max(1, min(cfg.rounds, math.ceil(2 * cfg.fleet.fraction * cfg.rounds)))


@dataclass(frozen=True)
class UploadPrivacy:
    mode: str  # "off" | "local" | "central" | "gnmax" | "confident-gnmax"
    bound: str
    clip_norm: float
    sensitivity: float  # L2 sensitivity of one reply (add/remove)
    noise_multiplier: float  # z of the answer noise: std = z * sensitivity
    threshold_noise_multiplier: float  # z1 of Confident-GNMax's threshold check
    accounted_noise_multiplier: float  # z of the Gaussian the accountant sees
    sampling_rate: float  # q per accounted event (1.0 for local: no amplification claimed)
    delta: float
    target_epsilon: float | None
    secure_aggregation: str = "off"  # "secagg+": distributed noise (central/gnmax), see privacy.distributed
    clip_failure: float = 0.0  # secagg+ distributed DP: P(any noised entry clipped), added to delta

    @property
    def distributed(self) -> bool:
        """Noise shares added by the clients, summed under SecAgg+ (central/gnmax with secagg+)."""
        return self.secure_aggregation != "off" and self.mode in ("central", "gnmax")

    @property
    def neighbouring(self) -> str:
        return "replace-one" if self.distributed else "add/remove"

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.sensitivity

    @property
    def threshold_std(self) -> float:
        return self.threshold_noise_multiplier * self.sensitivity

    @property
    def mechanism(self) -> str:
        if self.distributed:
            what = "noisy vote counts (GNMax)" if self.mode == "gnmax" else "Gaussian on the sum of replies"
            return (
                f"distributed {what} under SecAgg+: each client adds a share "
                f"({self.bound}, z={self.noise_multiplier:.4g}, "
                f"replace-one sensitivity {self.sensitivity:.4g}), no amplification by sampling claimed (q=1)"
            )
        return {
            "off": f"none ({self.bound})",
            "local": f"local Gaussian on each reply ({self.bound}, z={self.noise_multiplier:.4g}, "
            f"sensitivity {self.sensitivity:.4g})",
            "central": f"central Gaussian on the sum of replies ({self.bound}, z={self.noise_multiplier:.4g}, "
            f"sensitivity {self.sensitivity:.4g}), Poisson client sampling q={self.sampling_rate}",
            "gnmax": f"GNMax noisy votes (z={self.noise_multiplier:.4g}, sensitivity {self.sensitivity:.4g}), "
            f"Poisson client sampling q={self.sampling_rate}; data-independent analysis",
            "confident-gnmax": f"Confident-GNMax (threshold z1={self.threshold_noise_multiplier:.4g}, "
            f"answer z2={self.noise_multiplier:.4g}, sensitivity {self.sensitivity:.4g}), Poisson client sampling "
            f"q={self.sampling_rate}; data-independent analysis (every query charged)",
        }[self.mode]

    @property
    def protects_against(self) -> str:
        if self.mode == "local":
            return "everyone, the server included (each reply is noised on the device)"
        if self.distributed:
            return (
                "everyone, the (honest-but-curious) server included: it sees only the SecAgg+ sum, noised by "
                "the clients; assumes no surviving client colludes with the server"
            )
        return "everyone who sees the server's outputs (teacher signals, students); the server itself is trusted"

    def event(self) -> GaussianEvent:
        """What one round (central, GNMax) or one participation (local) costs."""
        from feddistill.privacy.accounting import GaussianEvent

        return GaussianEvent(self.accounted_noise_multiplier, self.sampling_rate, 1)

    def value_range(self) -> tuple[float, float]:
        """Values a valid reply can hold: the bound, widened by 20 noise stds for local noise."""
        b = row_norm_bound(self.bound, clip_norm=self.clip_norm)
        low = -b if self.bound == "clipped_logits" else 0.0
        slack = 20 * self.noise_std if self.mode == "local" else 0.0
        return low - slack, b + slack


def upload_privacy(cfg: RunConfig, noise_multiplier: float | None = None) -> UploadPrivacy:
    """The uploads' mechanism with answer noise ``noise_multiplier`` (z2 under Confident-GNMax);
    ``None`` calibrates it to ``privacy.target-epsilon`` (:func:`upload_noise_multiplier`)."""
    p = cfg.privacy
    z = upload_noise_multiplier(cfg) if noise_multiplier is None else noise_multiplier
    if cfg.distill.secure_aggregation != "off" and p.client_level in ("central", "gnmax"):
        return _secagg_upload(cfg, z)
    q = cfg.distill.query_size
    sensitivity = reply_sensitivity(p.bound, q, neighbouring="add/remove", clip_norm=p.clip_norm)
    common: dict[str, Any] = dict(
        mode=p.client_level,
        bound=p.bound,
        clip_norm=p.clip_norm,
        sensitivity=sensitivity,
        delta=p.delta,
        target_epsilon=p.target_epsilon or None,
        threshold_noise_multiplier=p.threshold_noise_multiplier,
        noise_multiplier=z,
    )
    if p.client_level == "off":
        return UploadPrivacy(accounted_noise_multiplier=0.0, sampling_rate=1.0, **common)
    if p.client_level == "local":
        return UploadPrivacy(accounted_noise_multiplier=z, sampling_rate=1.0, **common)
    rate = cfg.fleet.fraction
    if p.client_level in ("central", "gnmax"):
        return UploadPrivacy(accounted_noise_multiplier=z, sampling_rate=rate, **common)
    # confident-gnmax: the threshold check and the answer together are one Gaussian
    combined = 1 / math.sqrt(1 / p.threshold_noise_multiplier**2 + 1 / z**2)
    return UploadPrivacy(accounted_noise_multiplier=combined, sampling_rate=rate, **common)


def upload_noise_multiplier(cfg: RunConfig) -> float:
    """The answer noise z: ``privacy.noise-multiplier`` when given, else calibrated so that the
    run's planned events fit ``privacy.target-epsilon`` (0 without client-level DP)."""
    p = cfg.privacy
    if p.client_level == "off":
        return 0.0
    if p.noise_multiplier:
        return p.noise_multiplier
    if p.client_level == "local":
        return _calibrate(p.target_epsilon, p.delta, 1.0, planned_participations(cfg))
    if cfg.distill.secure_aggregation != "off" and p.client_level in ("central", "gnmax"):
        return _calibrate(p.target_epsilon, _secagg_delta(cfg), 1.0, cfg.rounds)
    z_total = _calibrate(p.target_epsilon, p.delta, cfg.fleet.fraction, cfg.rounds)
    if p.client_level != "confident-gnmax":
        return z_total
    rest = 1 / z_total**2 - 1 / p.threshold_noise_multiplier**2  # z2 of the answer, given z1
    if rest <= 0:
        raise ValueError(
            f"confident-gnmax: the threshold check alone (z1={p.threshold_noise_multiplier}) spends more than "
            f"the target epsilon {p.target_epsilon}; raise privacy.threshold-noise-multiplier"
        )
    return 1 / math.sqrt(rest)


def _secagg_delta(cfg: RunConfig) -> float:
    """The accountant's delta under distributed DP: the clipping failure takes the rest."""
    return cfg.privacy.delta - CLIP_FAILURE_SHARE * cfg.privacy.delta


def _secagg_upload(cfg: RunConfig, z: float) -> UploadPrivacy:
    """The uploads under SecAgg+ with distributed DP (``privacy.client-level`` central or gnmax);
    the rule is :mod:`feddistill.privacy.distributed`'s docstring."""
    p = cfg.privacy
    sensitivity = reply_sensitivity(p.bound, cfg.distill.query_size, neighbouring="replace-one", clip_norm=p.clip_norm)
    noise = run_shares(cfg, z)  # the sum carries N(0, (z * sensitivity)^2), clipped w.p. <= delta_clip
    return UploadPrivacy(
        mode=p.client_level,
        bound=p.bound,
        clip_norm=p.clip_norm,
        sensitivity=sensitivity,
        noise_multiplier=z,
        threshold_noise_multiplier=p.threshold_noise_multiplier,
        accounted_noise_multiplier=z,
        sampling_rate=1.0,
        delta=_secagg_delta(cfg),
        target_epsilon=p.target_epsilon or None,
        secure_aggregation=cfg.distill.secure_aggregation,
        clip_failure=noise.clip_failure,
    )


def secagg_privacy(cfg: RunConfig) -> tuple[UploadPrivacy, SecAggNoise]:
    """The run's :class:`UploadPrivacy` under SecAgg+ with distributed DP and its
    :class:`~feddistill.secagg_shares.SecAggNoise`."""
    plan = upload_privacy(cfg)
    return plan, secagg_shares(cfg, plan)


def secagg_shares(cfg: RunConfig, plan: UploadPrivacy) -> SecAggNoise:
    """The run's SecAgg+ shares and quantization for the uploads ``plan``, whatever its mode."""
    return run_shares(cfg, plan.noise_multiplier if plan.mode in ("local", "central", "gnmax") else 0.0)


@lru_cache(maxsize=256)
def _calibrate(target: float, delta: float, rate: float, steps: int) -> float:
    from feddistill.privacy.accounting import noise_multiplier_for_epsilon

    return noise_multiplier_for_epsilon(target, delta, rate, steps)


def dpsgd_schedule(sampling_rate: float, epochs: int) -> tuple[float, int]:
    """``(sampling_rate, steps)`` that :func:`feddistill.privacy.dpsgd.dp_train` will use, known
    before training.

    ``sampling_rate`` is q, given (``privacy.record-sampling-rate``): every step
    takes each record independently with probability q (expected batch size
    q·n), and an epoch is ``int(1 / q)`` such Poisson batches, as in Opacus'
    ``DPDataLoader``; so ``steps = epochs * int(1 / q)``. Neither depends on the
    number of records. A device checks
    ``ledger.can_afford(GaussianEvent(z, *dpsgd_schedule(q, epochs)))`` before
    it trains.
    """
    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(sampling_rate, bool) or not (math.isfinite(sampling_rate) and 0 < sampling_rate <= 1):
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    # Same expression as opacus.utils.uniform_sampler.UniformWithReplacementSampler.
    return float(sampling_rate), int(epochs) * int(1 / sampling_rate)


def record_noise_multiplier(cfg: RunConfig, sampling_rate: float, steps_per_round: int) -> float:
    """DP-SGD z for a device: given, or calibrated so that its planned participations fit its target.

    Every input is public — the config's Poisson rate q (``privacy.record-sampling-rate``),
    the steps per round from :func:`dpsgd_schedule` and the planned participations — so every
    device of a run uses the same z, whatever its number of records.
    """
    p = cfg.privacy
    if p.record_noise_multiplier:
        return p.record_noise_multiplier
    return _calibrate(
        p.record_target_epsilon, p.record_delta, sampling_rate, steps_per_round * planned_participations(cfg)
    )


@dataclass(frozen=True)
class RecordPrivacy:
    """Record-level DP-SGD on every device of a run: all public, the same on every device."""

    noise_multiplier: float
    sampling_rate: float  # Poisson q per step
    steps_per_round: int
    max_grad_norm: float
    delta: float
    target_epsilon: float | None
    planned_participations: int
    mechanism: str

    def event(self) -> GaussianEvent:
        """What one participation's DP-SGD costs."""
        from feddistill.privacy.accounting import GaussianEvent

        return GaussianEvent(self.noise_multiplier, self.sampling_rate, self.steps_per_round)


def record_privacy(cfg: RunConfig, noise_multiplier: float | None = None) -> RecordPrivacy | None:
    """The run's DP-SGD (None without record-level DP); ``None`` calibrates its z."""
    p = cfg.privacy
    if not p.record_level:
        return None
    rate, steps = dpsgd_schedule(p.record_sampling_rate, cfg.distill.revisit_epochs)
    return RecordPrivacy(
        noise_multiplier=record_noise_multiplier(cfg, rate, steps) if noise_multiplier is None else noise_multiplier,
        sampling_rate=rate,
        steps_per_round=steps,
        max_grad_norm=p.max_grad_norm,
        delta=p.record_delta,
        target_epsilon=p.record_target_epsilon or None,
        planned_participations=planned_participations(cfg),
        mechanism=record_mechanism(cfg),
    )


def record_mechanism(cfg: RunConfig) -> str:
    p = cfg.privacy
    q = p.record_sampling_rate
    sampling = (
        "full batches (q=1: every private example in every step, no amplification by sampling)"
        if q == 1
        else f"Poisson sampling of private examples at the public rate q={q}"
    )
    return (
        f"DP-SGD through Opacus (Abadi et al. 2016: per-sample clipping C={p.max_grad_norm}, {sampling}, "
        f"{cfg.distill.revisit_epochs} x int(1/q) steps per round, z from (q, steps, planned participations) "
        "only, never from a device's data); uploads are post-processing"
    )


NOISE_SOURCES = {
    "seeded": "seeded (simulation only: reproducible, and predictable by anyone who knows the run seed)",
    "os-entropy": "os-entropy (fresh OS entropy on every client for every draw; not reproducible, and no seed "
    "anyone knows can regenerate it)",
}


def client_noise_source(cfg: RunConfig, plan: UploadPrivacy) -> str:
    """results.json's word on where the client-level noise comes from."""
    if plan.mode == "local":
        return NOISE_SOURCES[cfg.privacy.noise_source]
    if plan.distributed:  # feddistill.client.secagg: noise_rng(None) on every client, always
        return "os-entropy (each client's SecAgg+ noise share, always; whatever privacy.noise-source says)"
    if cfg.privacy.noise_source == "os-entropy":
        return "server: drawn by the (trusted) server from OS entropy"
    return (
        "server: drawn by the (trusted) server from a generator seeded with the run seed, so reproducible and "
        "predictable by anyone who knows the seed (results.json names it): simulation only"
    )


def noise_seed(cfg: RunConfig, seed: int, device: bool) -> int | None:
    """The seed of a privacy-relevant draw: ``seed`` in a seeded simulation, otherwise ``None``
    (OS entropy). A device never gets a seed, whatever its config says."""
    return seed if cfg.privacy.noise_source == "seeded" and not device else None


def device_noise_refusal(cfg: RunConfig) -> str | None:
    """Why a device refuses this run config (it asks for seeded noise), or None."""
    if cfg.privacy.noise_source == "os-entropy":
        return None
    return (
        f"privacy.noise-source = {cfg.privacy.noise_source!r}: seeded noise is for simulation only (the server "
        "knows the seed and could subtract it); a device draws from OS entropy and needs "
        'privacy.noise-source = "os-entropy"'
    )


def check_devices_noise_source(cfg: RunConfig, num_devices: int) -> None:
    """The server's side of the same rule: refuse to start a seeded run that has devices."""
    if num_devices and cfg.privacy.noise_source != "os-entropy":
        raise ConfigError(
            f"{num_devices} node(s) are devices (node config data-dir), but privacy.noise-source = "
            f"{cfg.privacy.noise_source!r}: devices refuse seeded noise; run with "
            "--run-config 'privacy.noise-source=\"os-entropy\"'"
        )


@dataclass(frozen=True)
class RunPrivacy:
    """A run's whole privacy plan: the uploads' mechanism, the devices' DP-SGD, the SecAgg+ shares
    and the noise source. The server derives it once per run (:func:`run_privacy`, which
    calibrates every noise multiplier), keeps it in the run folder and sends it with every round;
    a device checks it against its own config (:func:`accept_privacy`) instead of calibrating."""

    upload: UploadPrivacy
    record: RecordPrivacy | None  # None without record-level DP
    secagg: SecAggNoise | None  # None without secure aggregation
    noise_source: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The wire form (a round's ``protocol.PRIVACY_PLAN``): floats round-trip exactly."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunPrivacy:
        return cls(
            upload=UploadPrivacy(**d["upload"]),
            record=None if d["record"] is None else RecordPrivacy(**d["record"]),
            secagg=None if d["secagg"] is None else SecAggNoise(**d["secagg"]),
            noise_source=str(d["noise_source"]),
        )

    @classmethod
    def from_json(cls, text: str) -> RunPrivacy:
        return cls.from_dict(json.loads(text))


def run_privacy(cfg: RunConfig, upload_noise: float | None = None, record_noise: float | None = None) -> RunPrivacy:
    """The run's privacy plan with the given noise multipliers; ``None`` calibrates one."""
    upload = upload_privacy(cfg, upload_noise)
    return RunPrivacy(
        upload=upload,
        record=record_privacy(cfg, record_noise),
        secagg=secagg_shares(cfg, upload) if cfg.distill.secure_aggregation != "off" else None,
        noise_source=cfg.privacy.noise_source,
    )


class PlanRefused(ValueError):
    """A device refuses the server's privacy plan (the message says which rule)."""


def accept_privacy(sent: str, cfg: RunConfig) -> RunPrivacy:
    """A device's check of the plan the server sent (cached: one check per plan and config).

    Everything but the calibrated noise multipliers follows from the device's own config, so the
    device rebuilds the plan from its config and the server's multipliers and refuses any
    difference; then, for the noise the device itself adds (local answer noise, SecAgg+ shares,
    DP-SGD), it checks with one accountant call that the multiplier meets its target epsilon over
    the planned participations: the server cannot talk a device into weaker noise.
    """
    key = (sent, cfg.digest())
    if key not in _ACCEPTED:
        _ACCEPTED[key] = _check_plan(sent, cfg)
    return _ACCEPTED[key]


_ACCEPTED: dict[tuple[str, str], RunPrivacy] = {}  # (plan JSON, config digest) -> the accepted plan


def _check_plan(sent: str, cfg: RunConfig) -> RunPrivacy:
    try:
        plan = RunPrivacy.from_json(sent)
        mine = run_privacy(cfg, plan.upload.noise_multiplier, plan.record.noise_multiplier if plan.record else 0.0)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as exc:
        raise PlanRefused(f"privacy plan unreadable or impossible for this device's config: {exc!r}") from None
    differences = _differences(dataclasses.asdict(plan), dataclasses.asdict(mine), "")
    if differences:
        raise PlanRefused("the server's privacy plan differs from this device's config: " + "; ".join(differences))
    _check_own_noise(plan, cfg)
    return plan


def _differences(sent: Any, mine: Any, where: str) -> list[str]:
    if isinstance(sent, dict) and isinstance(mine, dict):
        keys = sorted(set(sent) | set(mine))
        return [d for k in keys for d in _differences(sent.get(k), mine.get(k), f"{where}.{k}".lstrip("."))]
    return [] if sent == mine else [f"{where} = {sent!r}, expected {mine!r}"]


def _check_own_noise(plan: RunPrivacy, cfg: RunConfig) -> None:
    """Refuse a calibrated multiplier, for noise the device adds itself, that is too weak for
    its target epsilon over the planned participations. (A multiplier the device's own config
    fixes was compared already; its target then is a cap the ledger enforces round by round.)"""
    from feddistill.privacy.accounting import GaussianEvent, epsilon_pld

    up, rec = plan.upload, plan.record
    checks: list[tuple[str, GaussianEvent, float, float | None]] = []
    if up.target_epsilon and (up.mode == "local" or up.distributed) and not cfg.privacy.noise_multiplier:
        steps = planned_participations(cfg) if up.mode == "local" else cfg.rounds
        event = GaussianEvent(up.accounted_noise_multiplier, 1.0, steps)
        checks.append(("client-level", event, up.delta, up.target_epsilon))
    if rec is not None and rec.target_epsilon and not cfg.privacy.record_noise_multiplier:
        event = GaussianEvent(rec.noise_multiplier, rec.sampling_rate, rec.steps_per_round * rec.planned_participations)
        checks.append(("record-level", event, rec.delta, rec.target_epsilon))
    for unit, event, delta, target in checks:
        eps = epsilon_pld([event], delta)
        if target is not None and eps > target * (1 + 1e-9):
            raise PlanRefused(
                f"{unit} noise multiplier {event.noise_multiplier:.6g} gives epsilon {eps:.4f} > target {target:g} "
                f"(delta={delta:g}) over {event.steps} planned steps"
            )
