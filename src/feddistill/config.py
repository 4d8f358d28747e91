"""The run configuration: one typed, validated object made once at the edge.

A config comes from a TOML file (`feddistill simulate --config FILE.toml`) or from
Flower's flat run config (`flwr run .`, keys flattened with dots, e.g.
``"fleet.num-clients"``). Both go through :func:`parse_config`, which rejects
unknown keys, wrong types and impossible values with a message that names the
key and where it came from. Inner code takes :class:`RunConfig`, never dicts.

Keys may be written with ``-`` or ``_`` (Flower's run config uses ``-``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from feddistill.bounds import BOUNDS, row_norm_bound
from feddistill.data.datasets import DATASETS
from feddistill.data.partition import SCHEMES
from feddistill.encoding import ANSWER_DTYPES
from feddistill.errors import ConfigError  # defined below the config; the rest of the code imports it from here
from feddistill.model_names import MODEL_NAMES
from feddistill.secagg_shares import run_shares
from feddistill.strategies.registry import AGGREGATORS


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # a registered data set (data.datasets.DATASETS): "digits" (embedded), "fashion-mnist"
    data_dir: str = ""  # Fashion-MNIST IDX directory; "" = /usr/share/datasets/fashion-mnist
    reference_size: int = 450  # unlabelled public reference set
    public_labelled_size: int = 100  # labelled public sample for the public teacher
    test_size: int = 360  # digits only (Fashion-MNIST has its own test split)


@dataclass(frozen=True)
class FleetConfig:
    num_clients: int = 10
    partition: str = "dirichlet"  # "iid" | "dirichlet" | "shards"
    alpha: float = 0.5  # Dirichlet concentration (smaller = more skewed)
    shards_per_client: int = 2
    fraction: float = 0.5  # per-round client sampling rate q
    sampling: str = "poisson"  # "poisson" (each client independently w.p. q) | "fixed" (round(q*N) clients)
    students: str = "mlp"  # comma-separated; client i gets students[i % len] (heterogeneous fleet)


@dataclass(frozen=True)
class TeacherConfig:
    model: str = "cnn-large"
    epochs: int = 150
    lr: float = 0.05
    batch_size: int = 32


@dataclass(frozen=True)
class DistillConfig:
    # a registered aggregator (feddistill.strategies.registry): "mean" (FedMD) | "era" (DS-FL) | "median" |
    # "trimmed-mean" | "outlier-filtered"
    aggregator: str = "mean"
    trim_beta: float = 0.2  # trimmed-mean: fraction trimmed from each end of every coordinate
    keep_fraction: float = 0.7  # outlier-filtered: share of the round's clients kept
    era_temperature: float = 0.1
    temperature: float = 3.0  # KD temperature T
    query_size: int = 450  # |Q|: reference examples queried per round
    digest_epochs: int = 10  # client: KD toward the teacher signal on the queries
    revisit_epochs: int = 5  # client: cross-entropy on private data
    client_start: str = "global"  # a client starts each round from: "global" (the server's latest student) | "own"
    revisit_kd_weight: float = 1.0  # client: weight of KD on the queries while revisiting (0 = plain FedMD revisit)
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    answer_dtype: str = "float16"  # how answers travel: "float32" | "float16" | "uint8" | "vote" (top class, 1 byte)
    server_student: str = "mlp"  # architecture of the released global student
    server_epochs: int = 5  # server distillation epochs per round (on the reference set)
    server_lr: float = 0.05
    # How the server trains its student on the reference set each round (the public-only control the same way):
    # "kd" (KD toward the teacher signal) | "fixmatch" (the signal as soft labels on weak views, plus FixMatch's
    # consistency on strong views of every reference image: feddistill.semisup)
    server_training: str = "kd"
    fixmatch_threshold: float = 0.95  # FixMatch's confidence threshold for a pseudo-label
    # What a client answers (feddistill.client.answers). Prior correction subtracts the client's own
    # log label prior from its logits (logit adjustment); the prior never leaves the device.
    prior_correction: bool = False
    abstain_confidence: float = 0.0  # abstain on a row whose top (corrected) probability is below this (0: never)
    abstain_min_records: int = 0  # abstain where the client holds fewer private records of its predicted class
    # Which fleet answers become labels (feddistill.server.consensus): "answered" (every answered row, its
    # latest answer) | "consensus" (rows whose answers, accumulated over rounds, agree at least as much as
    # the share threshold calibrated on the public labels to reach consensus-precision)
    fleet_labels: str = "answered"
    consensus_precision: float = 0.9
    # Which reference rows a round asks about: "uniform" | "uncertain" (mostly where the released student's
    # margin is smallest: feddistill.server.consensus.select_queries)
    query_selection: str = "uniform"
    # Secure aggregation of the answers with Flower's SecAgg+ (feddistill.server.secagg): "off" | "secagg+".
    # The server then sees only the sum of the surviving clients' answers (mean aggregator only).
    secure_aggregation: str = "off"
    secagg_num_shares: int = 5  # shares of each client's keys (its SecAgg+ neighbourhood size), >= 3
    secagg_reconstruction_threshold: int = 3  # shares needed to unmask; also the fewest survivors a round accepts
    secagg_clipping_range: float = 0.0  # each uploaded entry is clipped to [-c, c] before quantization (0 = derived)
    secagg_quantization_range: int = 4194304  # 2**22 quantization levels over [-c, c]


@dataclass(frozen=True)
class BaselinesConfig:
    local_only: bool = True
    centralized: bool = True
    fedavg: bool = True
    max_local_clients: int = 20  # local-only baseline evaluates at most this many clients
    local_epochs: int = 20  # epochs for local-only and centralized training
    fedavg_local_epochs: int = 1
    dp_fedavg: bool = False  # also run Flower's DP-FedAvg at privacy.target-epsilon (client level)
    dp_fedavg_clip: float = 0.5  # DP-FedAvg's clipping norm of client updates
    fedavg_init: str = "public"  # "public" (pretrained on the labelled public set) | "scratch"


@dataclass(frozen=True)
class SimulationConfig:
    cpus_per_client: float = 1.0  # Ray resources per ClientApp actor
    round_timeout: float = 600.0  # seconds to wait for replies in one round
    node_wait_timeout: float = 120.0  # seconds to wait for all simulated nodes at start-up


@dataclass(frozen=True)
class PrivacyConfig:
    # Client-level DP of the uploads (unit: one whole client; neighbouring: add/remove):
    #   "off"; "local" (each client noises its own reply: holds against the server);
    #   "central" (the server noises the sum: trusted server); "gnmax" / "confident-gnmax"
    #   (PATE: noisy vote counts on the server, data-independent accounting).
    client_level: str = "off"
    bound: str = "probs"  # how answers are bounded: "probs" | "votes" | "clipped_logits"
    clip_norm: float = 1.0  # row L2 bound for clipped_logits
    noise_multiplier: float = 0.0  # z: noise std = z x L2 sensitivity (0 = calibrate to target-epsilon)
    target_epsilon: float = 0.0  # client-level budget the server enforces (0 = none)
    delta: float = 1e-5
    gnmax_threshold: float = 0.0  # Confident-GNMax: answer a query only if noisy max vote >= this
    threshold_noise_multiplier: float = 0.0  # Confident-GNMax: z of the threshold check
    # Record-level DP on devices (unit: one private example): DP-SGD through Opacus.
    record_level: bool = False
    record_noise_multiplier: float = 0.0  # 0 = calibrate to record-target-epsilon
    record_target_epsilon: float = 0.0  # each device's own budget, enforced on the device (0 = none)
    record_delta: float = 1e-5
    max_grad_norm: float = 1.0  # per-sample clipping norm C
    record_participations: int = 0  # rounds a device plans to serve (calibration); 0 = min(rounds, ceil(2 q rounds))
    # DP-SGD's Poisson rate q, public and the same on every device (expected batch q*n, known only to the
    # device): z and the device's epsilon then depend on public parameters and participations alone.
    # 1 = full batch, one step per epoch: devices hold <= ~1k examples here, and on the digits quick
    # start (eps=3) fewer, larger steps beat q=0.5 and q=0.2 (README, record-level DP).
    record_sampling_rate: float = 1.0
    # Where every privacy-relevant random draw comes from (local answer noise, DP-SGD's Poisson sampling
    # and noise): "seeded" (simulation only: reproducible, and predictable by anyone who knows the seed)
    # | "os-entropy". A device (node config data-dir) always draws from OS entropy and refuses "seeded".
    noise_source: str = "seeded"


@dataclass(frozen=True)
class SecurityConfig:
    signing_key: str = ""  # server: Ed25519 private key that signs every download ("" = unsigned)
    release_public_key: str = ""  # client: pinned server key; a device's node config `release-public-key` wins


@dataclass(frozen=True)
class ScenarioConfig:
    """Faults injected into a simulated fleet (never used on real devices)."""

    hostile_fraction: float = 0.0  # share of clients that answer with `attack`
    attack: str = "label-flip"  # "label-flip" | "random" | "scaled" | "nan" | "wrong-shape"
    dropout: float = 0.0  # probability that a sampled client drops out of a round (sends no answer)
    # Label shift (0 = none): clients are split by label mix into population A (private labels
    # mostly in the lower half of the classes) and B (the rest); rounds before `shift-round`
    # sample only A, rounds from it only B (feddistill.simulations.shift).
    shift_round: int = 0


@dataclass(frozen=True)
class ReleaseConfig:
    """Versioned releases of the global student: the validation gate and its calibration."""

    gate: bool = True  # promote a round's candidate only if it does not regress (else keep the last release)
    # Share of the labelled public sample held out from the public teacher: the gate's and the
    # temperature scaling's validation split (public data; 0 = none, then gate and calibrate must be off).
    validation_fraction: float = 0.2
    # Tolerances are loose by default: the digits validation split is 20 examples (1 = 0.05 accuracy).
    accuracy_tolerance: float = 0.05  # reject if validation accuracy < the release's - this
    ece_tolerance: float = 0.1  # reject if validation ECE > the release's + this
    agreement_tolerance: float = 0.05  # reject if agreement with the teacher signal < the release's - this
    calibrate: bool = True  # temperature scaling of every release, fitted on the validation split


@dataclass(frozen=True)
class DriftConfig:
    # Alert when the mean KL(new || previous teacher signal) exceeds this (0 = never); measured on
    # the rows the round changed whose previous value was already the fleet's (feddistill.server.drift).
    kl_threshold: float = 0.2


@dataclass(frozen=True)
class AuditConfig:
    keep_artifacts: bool = False  # opt-in: keep uploads, local students and canaries for `feddistill audit`
    canaries: int = 0  # one-run audit (Steinke et al. 2023): m canaries, each included w.p. 1/2
    canary_client: int = 0  # the client whose private data receives the included canaries


@dataclass(frozen=True)
class RunConfig:
    method: str = "feddistill"  # "feddistill" | "fedavg" | "dp-fedavg" (Flower's peers on the same fleet)
    seed: int = 0
    rounds: int = 10
    output_dir: str = "runs/latest"
    # `flwr run` only: continue the interrupted run in output_dir from its checkpoint (e.g. after the
    # SuperLink restarted and its ServerApp died); `feddistill simulate` has --resume instead
    resume: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)

    @property
    def student_names(self) -> list[str]:
        return [s.strip() for s in self.fleet.students.split(",")]

    def student_for(self, partition_id: int) -> str:
        names = self.student_names
        return names[partition_id % len(names)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_flat(self) -> dict[str, Any]:
        """Flower run-config form: ``{"fleet.num-clients": 10, ...}``."""
        return flat_run_config(self.to_dict())

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form (the config hash recorded in results).

        Where the run lives (``output_dir``) and whether it is being resumed (``resume``) are left
        out: they say nothing about what the run computes, and a run folder that was moved, or
        named by another spelling of its path, must still resume (its checkpoint is keyed by this hash)."""
        content = {k: v for k, v in self.to_dict().items() if k not in ("output_dir", "resume")}
        blob = json.dumps(content, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def flat_run_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flower's run-config form of a nested, flat or mixed config: ``{"fleet.num-clients": 10, ...}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            for sub, v in flat_run_config(value).items():
                flat[f"{key}.{sub}".replace("_", "-")] = v
        else:
            flat[key.replace("_", "-")] = value
    return flat


# ---- parsing and validation ----

# The names a key accepts. Where the code that runs them keeps a registry or a tuple, that is the
# list (aggregators, data sets, partitions, wire dtypes, bounds, models).
_CHOICES: dict[str, Collection[str]] = {
    "method": ("feddistill", "fedavg", "dp-fedavg"),
    "data.dataset": DATASETS,
    "fleet.partition": SCHEMES,
    "fleet.sampling": ("poisson", "fixed"),
    "distill.aggregator": AGGREGATORS,
    "distill.answer_dtype": ANSWER_DTYPES,
    "distill.client_start": ("global", "own"),
    "distill.secure_aggregation": ("off", "secagg+"),
    "baselines.fedavg_init": ("public", "scratch"),
    "privacy.client_level": ("off", "local", "central", "gnmax", "confident-gnmax"),
    "privacy.bound": BOUNDS,
    "privacy.noise_source": ("seeded", "os-entropy"),
    "distill.server_training": ("kd", "fixmatch"),
    "distill.fleet_labels": ("answered", "consensus"),
    "distill.query_selection": ("uniform", "uncertain"),
    "scenario.attack": ("label-flip", "random", "scaled", "nan", "wrong-shape"),
    "teacher.model": MODEL_NAMES,
    "distill.server_student": MODEL_NAMES,
}

# (key, lower bound, lower bound inclusive?, upper bound or None)
_RANGES: dict[str, tuple[float, bool, float | None]] = {
    "rounds": (1, True, None),
    "data.reference_size": (1, True, None),
    "data.public_labelled_size": (1, True, None),
    "data.test_size": (0, True, None),
    "fleet.num_clients": (1, True, None),
    "fleet.alpha": (0, False, None),
    "fleet.shards_per_client": (1, True, None),
    "fleet.fraction": (0, False, 1.0),
    "teacher.epochs": (0, True, None),
    "teacher.lr": (0, False, None),
    "teacher.batch_size": (1, True, None),
    "distill.era_temperature": (0, False, None),
    "distill.trim_beta": (0, True, 0.5),
    "distill.keep_fraction": (0, False, 1.0),
    "distill.temperature": (0, False, None),
    "distill.query_size": (1, True, None),
    "distill.digest_epochs": (0, True, None),
    "distill.revisit_epochs": (0, True, None),
    "distill.batch_size": (1, True, None),
    "distill.revisit_kd_weight": (0, True, None),
    "distill.lr": (0, False, None),
    "distill.momentum": (0, True, 1.0),
    "distill.server_epochs": (0, True, None),
    "distill.server_lr": (0, False, None),
    "distill.fixmatch_threshold": (0, False, 1.0),
    "distill.abstain_confidence": (0, True, 1.0),
    "distill.abstain_min_records": (0, True, None),
    "distill.consensus_precision": (0, False, 1.0),
    "distill.secagg_num_shares": (3, True, None),
    "distill.secagg_reconstruction_threshold": (2, True, None),
    "distill.secagg_clipping_range": (0, True, None),
    "distill.secagg_quantization_range": (2, True, None),
    "baselines.max_local_clients": (1, True, None),
    "baselines.local_epochs": (1, True, None),
    "baselines.fedavg_local_epochs": (1, True, None),
    "baselines.dp_fedavg_clip": (0, False, None),
    "simulation.cpus_per_client": (0, False, None),
    "audit.canaries": (0, True, None),
    "scenario.hostile_fraction": (0, True, 1.0),
    "scenario.dropout": (0, True, 1.0),
    "privacy.clip_norm": (0, False, None),
    "privacy.noise_multiplier": (0, True, None),
    "privacy.target_epsilon": (0, True, None),
    "privacy.delta": (0, False, 0.1),
    "privacy.gnmax_threshold": (0, True, None),
    "privacy.threshold_noise_multiplier": (0, True, None),
    "privacy.record_noise_multiplier": (0, True, None),
    "privacy.record_target_epsilon": (0, True, None),
    "privacy.record_delta": (0, False, 0.1),
    "privacy.max_grad_norm": (0, False, None),
    "privacy.record_participations": (0, True, None),
    "privacy.record_sampling_rate": (0, False, 1.0),
    "audit.canary_client": (0, True, None),
    "simulation.round_timeout": (0, False, None),
    "simulation.node_wait_timeout": (0, False, None),
    "scenario.shift_round": (0, True, None),
    "release.validation_fraction": (0, True, 0.9),
    "release.accuracy_tolerance": (0, True, 1.0),
    "release.ece_tolerance": (0, True, 1.0),
    "release.agreement_tolerance": (0, True, 1.0),
    "drift.kl_threshold": (0, True, None),
}


def _norm(key: str) -> str:
    return key.replace("-", "_")


def _coerce(value: Any, typ: type, where: str) -> Any:
    # bool is a subclass of int: reject it where a number is expected, and vice versa.
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                raise ConfigError(f"{where}: {value!r} is out of range") from None
            if not math.isfinite(number):
                raise ConfigError(f"{where}: must be a finite number, got {value!r}")
            return number
    elif typ is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {typ.__name__}, got {type(value).__name__} {value!r}")


def _build(cls: type, values: dict[str, Any], prefix: str, source: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{source}: keys must be strings, got {raw_key!r}")
        key = _norm(raw_key)
        dotted = f"{prefix}{key}"
        if key not in known:
            valid = ", ".join(sorted(k.replace("_", "-") for k in known))
            raise ConfigError(f"{source}: unknown key '{prefix}{raw_key}' (valid keys here: {valid})")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a table, got {value!r}")
            kwargs[key] = _build(typ, value, f"{dotted}.", source)
        else:
            kwargs[key] = _coerce(value, typ, f"{source}: '{dotted}'")
    return cls(**kwargs)


def _check_values(cfg: RunConfig, source: str, keys: set[str] | None = None) -> None:
    """Each key's own rule (its choices or range), for every key or only for ``keys``
    (dotted, with underscores): rules that relate several keys are :func:`_check`'s."""

    def get(dotted: str) -> Any:
        obj: Any = cfg
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj

    for dotted, choices in _CHOICES.items():
        if (keys is None or dotted in keys) and get(dotted) not in choices:
            raise ConfigError(
                f"{source}: '{dotted.replace('_', '-')}' = {get(dotted)!r} is not one of {', '.join(choices)}"
            )
    for dotted, (lo, inclusive, hi) in _RANGES.items():
        if keys is not None and dotted not in keys:
            continue
        v = get(dotted)
        ok = (v >= lo if inclusive else v > lo) and (hi is None or v <= hi)
        if not ok:
            bound = f"{'>=' if inclusive else '>'} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise ConfigError(f"{source}: '{dotted.replace('_', '-')}' = {v!r} must be {bound}")


def _check(cfg: RunConfig, source: str) -> None:
    _check_values(cfg, source)
    for name in cfg.student_names:
        if name not in MODEL_NAMES:
            raise ConfigError(
                f"{source}: 'fleet.students' names unknown model {name!r} (known: {', '.join(MODEL_NAMES)})"
            )
    if cfg.data.public_labelled_size > cfg.data.reference_size:
        raise ConfigError(
            f"{source}: 'data.public-labelled-size' ({cfg.data.public_labelled_size}) must not exceed "
            f"'data.reference-size' ({cfg.data.reference_size}): "
            "the labelled public sample is drawn from the reference set"
        )
    if cfg.distill.query_size > cfg.data.reference_size:
        raise ConfigError(
            f"{source}: 'distill.query-size' ({cfg.distill.query_size}) must not exceed "
            f"'data.reference-size' ({cfg.data.reference_size})"
        )
    _check_privacy(cfg, source)
    _check_secagg(cfg, source)
    _check_release(cfg, source)
    if cfg.scenario.shift_round > cfg.rounds:
        raise ConfigError(
            f"{source}: 'scenario.shift-round' ({cfg.scenario.shift_round}) must be <= 'rounds' ({cfg.rounds})"
        )
    if cfg.audit.canary_client >= cfg.fleet.num_clients:
        raise ConfigError(
            f"{source}: 'audit.canary-client' ({cfg.audit.canary_client}) "
            f"must be < 'fleet.num-clients' ({cfg.fleet.num_clients})"
        )
    if cfg.data.dataset == "digits" and cfg.data.test_size < 1:
        raise ConfigError(f"{source}: 'data.test-size' must be >= 1 for digits (it has no test split of its own)")


def validation_size(cfg: RunConfig) -> int:
    """Examples of the labelled public sample held out as the release validation split."""
    return int(round(cfg.release.validation_fraction * cfg.data.public_labelled_size))


def _check_release(cfg: RunConfig, source: str) -> None:
    r = cfg.release
    if r.validation_fraction == 0:
        if r.gate or r.calibrate:
            raise ConfigError(
                f"{source}: 'release.gate' and 'release.calibrate' need a validation split: "
                "'release.validation-fraction' must be > 0 (or turn both off)"
            )
        return
    n = validation_size(cfg)
    if not 1 <= n < cfg.data.public_labelled_size:
        raise ConfigError(
            f"{source}: 'release.validation-fraction' = {r.validation_fraction} holds out {n} of the "
            f"{cfg.data.public_labelled_size} labelled public examples ('data.public-labelled-size'); "
            "it must hold out at least 1 and leave at least 1 for the public teacher"
        )


def _check_privacy(cfg: RunConfig, source: str) -> None:
    p = cfg.privacy
    if p.client_level != "off":
        if p.noise_multiplier == 0 and p.target_epsilon == 0:
            raise ConfigError(
                f"{source}: 'privacy.client-level' = {p.client_level!r} needs 'privacy.noise-multiplier' > 0 "
                "or 'privacy.target-epsilon' > 0 (to calibrate the noise)"
            )
        if cfg.fleet.sampling != "poisson":
            raise ConfigError(
                f"{source}: client-level DP needs 'fleet.sampling' = 'poisson': the subsampled-Gaussian "
                "accountant assumes each client is sampled independently"
            )
    if cfg.distill.answer_dtype in ("uint8", "vote") and (p.client_level == "local" or p.bound == "clipped_logits"):
        raise ConfigError(
            f"{source}: 'distill.answer-dtype' = {cfg.distill.answer_dtype!r} carries bounded, noise-free "
            "answers only: it cannot carry locally noised answers or clipped logits; use float16"
        )
    if p.client_level in ("gnmax", "confident-gnmax") and p.bound != "votes":
        raise ConfigError(f"{source}: 'privacy.client-level' = {p.client_level!r} needs 'privacy.bound' = 'votes'")
    if p.client_level == "confident-gnmax" and (p.gnmax_threshold == 0 or p.threshold_noise_multiplier == 0):
        raise ConfigError(
            f"{source}: confident-gnmax needs 'privacy.gnmax-threshold' > 0 "
            "and 'privacy.threshold-noise-multiplier' > 0"
        )
    if (cfg.method == "dp-fedavg" or cfg.baselines.dp_fedavg) and p.noise_multiplier == 0 and p.target_epsilon == 0:
        raise ConfigError(f"{source}: DP-FedAvg needs 'privacy.noise-multiplier' > 0 or 'privacy.target-epsilon' > 0")
    if p.record_level and p.record_noise_multiplier == 0 and p.record_target_epsilon == 0:
        raise ConfigError(
            f"{source}: 'privacy.record-level' = true needs 'privacy.record-noise-multiplier' > 0 "
            "or 'privacy.record-target-epsilon' > 0"
        )
    _check_abstention(cfg, source)
    if p.record_level and cfg.distill.revisit_epochs == 0:
        raise ConfigError(f"{source}: 'privacy.record-level' = true needs 'distill.revisit-epochs' >= 1")


def abstains(cfg: RunConfig) -> bool:
    """Whether clients may send abstentions (an all-zero row; a vote of ``ABSTAIN_VOTE``)."""
    return cfg.distill.abstain_confidence > 0 or cfg.distill.abstain_min_records > 0


def _check_abstention(cfg: RunConfig, source: str) -> None:
    d, p = cfg.distill, cfg.privacy
    if d.fleet_labels == "consensus" and cfg.release.validation_fraction == 0:
        raise ConfigError(
            f"{source}: 'distill.fleet-labels' = 'consensus' calibrates its threshold on the held-out "
            "public labels: 'release.validation-fraction' must be > 0"
        )
    if abstains(cfg) and (p.bound == "clipped_logits" or d.aggregator != "mean"):
        raise ConfigError(
            f"{source}: abstention ('distill.abstain-confidence' / 'distill.abstain-min-records') needs "
            "'privacy.bound' = 'probs' or 'votes' and 'distill.aggregator' = 'mean': an abstention is an "
            "all-zero row, which only those tell apart from an answer"
        )
    if p.record_level and (d.prior_correction or d.abstain_min_records > 0):
        raise ConfigError(
            f"{source}: 'privacy.record-level' = true cannot be combined with 'distill.prior-correction' "
            "or 'distill.abstain-min-records': both read the device's label counts, which DP-SGD does "
            "not protect (use 'distill.abstain-confidence', which reads only the DP-trained model)"
        )


def _check_secagg(cfg: RunConfig, source: str) -> None:
    """SecAgg+ (feddistill.server.secagg): the server sees only a sum, so everything that needs
    single replies is refused here; the noise shares against clipping range and quantization step by
    feddistill.secagg_shares (the rule: feddistill.privacy.distributed)."""
    d, p = cfg.distill, cfg.privacy
    if d.secure_aggregation == "off":
        return
    mode = f"'distill.secure-aggregation' = {d.secure_aggregation!r}"
    if cfg.method != "feddistill":
        raise ConfigError(f"{source}: {mode} secures feddistill's answers; 'method' = {cfg.method!r} does not use it")
    if d.aggregator != "mean":
        raise ConfigError(
            f"{source}: {mode} gives the server only the sum of the answers, so 'distill.aggregator' must be "
            f"'mean' (got {d.aggregator!r}: robust and entropy-reduced aggregators need every single reply)"
        )
    if p.client_level == "confident-gnmax":
        raise ConfigError(
            f"{source}: {mode} does not support 'privacy.client-level' = 'confident-gnmax' "
            "(its threshold check needs a second noisy sum); use 'gnmax', 'central' or 'local'"
        )
    if d.secagg_reconstruction_threshold >= d.secagg_num_shares:
        raise ConfigError(
            f"{source}: 'distill.secagg-reconstruction-threshold' ({d.secagg_reconstruction_threshold}) must be < "
            f"'distill.secagg-num-shares' ({d.secagg_num_shares})"
        )
    if d.secagg_reconstruction_threshold > cfg.fleet.num_clients:
        raise ConfigError(
            f"{source}: 'distill.secagg-reconstruction-threshold' ({d.secagg_reconstruction_threshold}) exceeds "
            f"'fleet.num-clients' ({cfg.fleet.num_clients}): no round could ever be unmasked"
        )
    # Flower sums the quantized uploads (each in [0, T], plus the weight factor T) modulo 2**32:
    # the sum over every client must not wrap around.
    if cfg.fleet.num_clients * d.secagg_quantization_range >= 2**32:
        raise ConfigError(
            f"{source}: 'distill.secagg-quantization-range' ({d.secagg_quantization_range}) times "
            f"'fleet.num-clients' ({cfg.fleet.num_clients}) must be < 2**32 (SecAgg+'s modulus), or the sum "
            f"wraps around; use at most {(2**32 - 1) // cfg.fleet.num_clients}"
        )
    if cfg.audit.keep_artifacts:
        raise ConfigError(
            f"{source}: {mode} and 'audit.keep-artifacts' = true: the server never sees a single "
            "upload, so there are none to keep for the uploads audit"
        )
    if d.secagg_clipping_range:
        bound = row_norm_bound(p.bound, clip_norm=p.clip_norm)
        if d.secagg_clipping_range < bound:
            raise ConfigError(
                f"{source}: 'distill.secagg-clipping-range' ({d.secagg_clipping_range}) must be >= {bound:g}, the "
                f"largest value a bounded answer holds ('privacy.bound' = {p.bound!r}); 0 derives it"
            )
    if cfg.scenario.hostile_fraction > 0:
        raise ConfigError(
            f"{source}: {mode} and 'scenario.hostile-fraction' > 0: the hostile-client scenario measures per-reply "
            "validation, which SecAgg+ rules out (a client that deviates from the protocol corrupts the sum undetected)"
        )
    # Shares against clipping range and quantization step. Calibrating z to a target epsilon takes
    # seconds (dp-accounting), too slow for every parse: then the server checks it when the run starts.
    if p.client_level != "off" and p.noise_multiplier:
        try:
            run_shares(cfg, p.noise_multiplier)  # clipping range and quantization step against the noise shares
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def parse_config(values: dict[str, Any], source: str = "config") -> RunConfig:
    """Build and validate a RunConfig from a nested dict (TOML) or a flat dotted dict (Flower)."""
    cfg = _build(RunConfig, _nest(values, source), "", source)
    _check(cfg, source)
    return cfg


def _nest(values: dict[str, Any], source: str) -> dict[str, Any]:
    """The nested (TOML) form of a nested, flat dotted (Flower) or mixed dict."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        if "." in key:  # Flower run config: "fleet.num-clients"
            section, _, sub = key.partition(".")
            table = nested.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: '{section}' is both a value and a table")
            table[sub] = value
        elif isinstance(value, dict):
            nested.setdefault(key, {}).update(value)
        else:
            nested[key] = value
    return nested


def load_config(
    path: str | Path | None, overrides: dict[str, Any] | None = None, overrides_source: str = "--set"
) -> RunConfig:
    """Read a TOML config file (None = all defaults) and apply flat dotted overrides.

    Errors name where the bad value came from: the file for its own keys, ``overrides_source``
    for an override's key, both for a rule that relates keys from the two."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        values = _nest(read_toml(Path(path), "config file"), source)
        _check_values(_build(RunConfig, values, "", source), source)  # the file's own keys, alone
    if not overrides:
        return parse_config(values, source)
    # an override's own key and value: its mistakes are the override's, not the file's
    nested = _nest(overrides, overrides_source)
    _check_values(_build(RunConfig, nested, "", overrides_source), overrides_source, keys={_norm(k) for k in overrides})
    for key, value in nested.items():
        if isinstance(value, dict):
            if not isinstance(values.setdefault(key, {}), dict):
                raise ConfigError(f"{source}: '{key}' is not a table")
            values[key].update(value)
        else:
            values[key] = value
    return parse_config(values, overrides_source if path is None else f"{source} with {overrides_source}")


def parse_override(text: str, source: str = "--set") -> tuple[str, Any]:
    """``KEY=VALUE`` (a command line's ``--set``) as ``(key, value)``: the value is read as a TOML
    value (``3``, ``0.5``, ``true``, ``"a b"``), and as a bare string when it is not one."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{source} {text!r}: expected KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string
    return key.strip(), value


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's table, or a one-line :class:`ConfigError` naming the file and what is wrong."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a {what}")
    if not path.exists():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (byte {exc.start} is not UTF-8); a {what} is TOML text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc.strerror or type(exc).__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
