"""Property-based tests of the two edges that take untrusted input: reply validation and config parsing.

Each property states the rule independently of the code under test: a reply is valid
iff it answers this round (round, digest), carries only the answers matrix, of shape
(|Q|, C), float16/float32/uint8, finite and inside [low - tol, high + tol] (the entry rule;
with local noise it is the whole value rule); a config is either a RunConfig that satisfies
every documented invariant, or a ConfigError. The row rules and every other field of the
reply schema are fuzzed through the whole server path by `bench/fuzz.py`, whose bounded
slice runs here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from feddistill import protocol
from feddistill.config import ConfigError, RunConfig, parse_config
from feddistill.model_names import MODEL_NAMES
from feddistill.strategies.validation import ReplyCheck, check_reply

FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _task_identity():
    # Flower's runtime sets the identity of the running task; building Messages outside it needs one.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


# ---- reply validation ----

ACCEPTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.uint8))
EXTRAS = ("none", "extra key", "extra record", "renamed key", "no answers record")


@dataclass
class ReplyCase:
    """Everything a generated reply is made of (kept for the failure message)."""

    error: int | None  # error code of an error reply, else None
    meta: dict[str, Any] | None  # the reply meta record (None: missing)
    array: np.ndarray | None  # the answers matrix (None: undecodable bytes instead)
    extra: str
    max_bytes: int


@st.composite
def reply_checks(draw) -> ReplyCheck:
    if draw(st.booleans()):
        low, high = 0.0, 1.0  # probabilities / votes
    else:
        bound = draw(st.floats(0.1, 10.0))  # clipped logits: [-B, B]
        low, high = -bound, bound
    return ReplyCheck(
        round=draw(st.integers(0, 1000)),
        digest=draw(st.text("abcdef0123456789", min_size=1, max_size=8)),
        num_queries=draw(st.integers(1, 6)),
        num_classes=draw(st.integers(1, 5)),
        low=low,
        high=high,
        tolerance=draw(st.sampled_from([1e-3, 0.05])),
        local_noise=True,  # noised rows: the entry rule below is the whole value rule (no row rule)
    )


# What a generated entry is, relative to the check's range: a kind, and a position u in [0, 1].
VALID_KINDS = ("in", "in", "tol-high", "tol-low")  # inside [low - tol, high + tol]
BAD_KINDS = ("out-high", "out-low", "nan", "inf", "-inf")
POSITIONS = st.floats(0.0, 1.0)


def _value(check: ReplyCheck, kind: str, u: float) -> float:
    tol = check.tolerance
    return {
        "in": check.low + u * (check.high - check.low),
        "tol-high": check.high + u * tol / 2,
        "tol-low": check.low - u * tol / 2,
        "out-high": check.high + 2 * tol + u * 1e6,
        "out-low": check.low - 2 * tol - u * 1e6,
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
    }[kind]


# Ways a reply can be wrong besides its matrix (a generated reply has a few of them, often none).
FAULTS = (
    "wrong round",
    "str round",
    "half round",
    "missing round",
    "wrong digest",
    "bytes digest",
    "missing digest",
    "missing meta",
    "refused",
    "dropped",
    "error",
    "undecodable",
    "small max-bytes",
    *EXTRAS[1:],
)
ERROR_CODES = (("refused", protocol.REFUSED), ("dropped", protocol.DROPPED), ("error", 99))
WRONG_DTYPES = (np.float64, np.int32, np.int64, np.bool_)


@st.composite
def reply_cases(draw) -> tuple[ReplyCheck, ReplyCase]:
    check = draw(reply_checks())
    count = draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3]))  # mostly none or one: each check gets tested alone
    faults = draw(st.sets(st.sampled_from(FAULTS), min_size=count, max_size=count))
    q, c = check.num_queries, check.num_classes
    shape = draw(
        st.one_of(
            st.just((q, c)), st.sampled_from([(q + 1, c), (q, c + 1), (q, c - 1), (q * c,), (c, q), (1, q, c), ()])
        )
    )
    dtype = draw(st.one_of(st.sampled_from([np.float32, np.float16, np.uint8]), st.sampled_from(WRONG_DTYPES)))
    size = int(np.prod(shape))
    matrix = draw(st.sampled_from(["in range", "within tolerance", "one bad entry", "anything"]))
    kinds = {
        "in range": st.just("in"),
        "within tolerance": st.sampled_from(VALID_KINDS),
        "one bad entry": st.just("in"),
        "anything": st.sampled_from(VALID_KINDS + BAD_KINDS),
    }[matrix]
    entries = draw(st.lists(st.tuples(kinds, POSITIONS), min_size=size, max_size=size))
    if matrix == "one bad entry" and size:
        entries[draw(st.integers(0, size - 1))] = (draw(st.sampled_from(BAD_KINDS)), draw(POSITIONS))
    flat = [_value(check, kind, u) for kind, u in entries]
    with np.errstate(all="ignore"):  # casting NaN / Inf / 1e6 to int or float16 is part of the test
        array = np.array(flat, dtype=np.float64).reshape(shape).astype(dtype)
    meta: dict[str, Any] = {protocol.ROUND: check.round, protocol.DIGEST: check.digest}
    for fault, key, value in [
        ("wrong round", protocol.ROUND, check.round + draw(st.sampled_from([-1, 1, 7]))),
        ("str round", protocol.ROUND, str(check.round)),
        ("half round", protocol.ROUND, check.round + 0.5),
        ("wrong digest", protocol.DIGEST, check.digest + "0"),
        ("bytes digest", protocol.DIGEST, check.digest.encode()),
    ]:
        if fault in faults:
            meta[key] = value
    for fault, key in [("missing round", protocol.ROUND), ("missing digest", protocol.DIGEST)]:
        if fault in faults:
            del meta[key]
    extras = [f for f in EXTRAS[1:] if f in faults]
    return check, ReplyCase(
        error=next((code for fault, code in ERROR_CODES if fault in faults), None),
        meta=None if "missing meta" in faults else meta,
        array=None if "undecodable" in faults else array,
        extra=extras[0] if extras else "none",
        max_bytes=draw(st.integers(128, 250)) if "small max-bytes" in faults else check.max_bytes,
    )


def _request() -> Message:
    return Message(RecordDict({}), dst_node_id=1, message_type=protocol.DISTILL)


def _encoded(case: ReplyCase) -> Array:
    if case.array is None:
        return Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"\x93NUMPY not really")
    return Array(np.ascontiguousarray(case.array))


def _message(case: ReplyCase) -> Message:
    if case.error is not None:
        return Message(Error(case.error, "no"), reply_to=_request())
    answers = _encoded(case)
    arrays = {protocol.ANSWERS: answers}
    records: dict[str, Any] = {protocol.METRICS_RECORD: MetricRecord({})}  # empty: a run without record-level DP
    if case.extra == "extra key":
        arrays["logits"] = Array(np.zeros(2, np.float32))
    elif case.extra == "renamed key":
        arrays = {"answer": answers}
    elif case.extra == "extra record":
        records["weights"] = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    if case.extra != "no answers record":
        records[protocol.ANSWERS_RECORD] = ArrayRecord(arrays)
    if case.meta is not None:
        records[protocol.REPLY_META] = ConfigRecord(case.meta)
    return Message(RecordDict(records), reply_to=_request())


def _as_probabilities(array: np.ndarray) -> np.ndarray:
    """uint8 answers are quantized probabilities: k means k / 255."""
    return array.astype(np.float64) / 255 if array.dtype == np.uint8 else array.astype(np.float64)


def _truly_valid(check: ReplyCheck, case: ReplyCase) -> bool:
    """The validity rule, written from the protocol, not from validation.py."""
    if case.error is not None or case.meta is None or case.extra != "none" or case.array is None:
        return False
    round_ = case.meta.get(protocol.ROUND)
    if type(round_) is not int or round_ != check.round or case.meta.get(protocol.DIGEST) != check.digest:
        return False
    array = case.array
    if array.dtype not in ACCEPTED_DTYPES or array.shape != (check.num_queries, check.num_classes):
        return False
    if len(_encoded(case).data) > check.max_bytes:
        return False
    values = _as_probabilities(array)
    if not np.isfinite(values).all():
        return False
    return bool(values.min() >= check.low - check.tolerance and values.max() <= check.high + check.tolerance)


def _on_the_edge(check: ReplyCheck, case: ReplyCase) -> bool:
    """A value within float32 rounding of low - tol or high + tol: float32 and float64 may disagree."""
    if case.array is None or case.array.dtype not in ACCEPTED_DTYPES or case.array.size == 0:
        return False
    values = _as_probabilities(case.array)
    edges = np.array([check.low - check.tolerance, check.high + check.tolerance])
    return bool(np.isclose(values[..., None], edges, rtol=1e-6, atol=0).any())


@settings(max_examples=700, **FAST)
@given(reply_cases())
def test_check_reply_never_raises_and_accepts_iff_valid(generated):
    check, case = generated
    assume(not _on_the_edge(check, case))
    check = dataclasses.replace(check, max_bytes=case.max_bytes)
    answers, reason = check_reply(_message(case), check)  # must not raise, whatever the reply
    expected = _truly_valid(check, case)
    assert (reason is None) == expected, (reason, case)
    if expected:
        assert answers.dtype == np.float32 and answers.shape == (check.num_queries, check.num_classes)
        np.testing.assert_allclose(answers, _as_probabilities(case.array), rtol=1e-6)
    else:
        assert answers is None and isinstance(reason, str) and reason


@pytest.mark.parametrize("round_", [3.0, True])
def test_round_must_be_an_int(round_):
    check = ReplyCheck(round=int(round_), digest="abc", num_queries=2, num_classes=2)
    case = ReplyCase(
        None,
        {protocol.ROUND: round_, protocol.DIGEST: "abc"},
        np.full((2, 2), 0.5, np.float32),
        "none",
        check.max_bytes,
    )
    assert check_reply(_message(case), check)[1] is not None


def test_empty_query_set_does_not_raise():
    check = ReplyCheck(round=1, digest="abc", num_queries=0, num_classes=3)
    case = ReplyCase(
        None, {protocol.ROUND: 1, protocol.DIGEST: "abc"}, np.zeros((0, 3), np.float32), "none", check.max_bytes
    )
    check_reply(_message(case), check)


# ---- the whole server path (bench/fuzz.py, a bounded slice) ----


def test_fuzzed_replies_never_crash_the_server_path_nor_reach_aggregation():
    """300 hypothesis-generated rounds plus issue 15's failing replies through validation, every
    aggregator, the device ledger, the privacy report and the SecAgg+ metrics rule
    (`python -m bench fuzz` runs 10,000)."""
    from bench.fuzz import issue_cases, run_fuzz

    tally = run_fuzz(300, seed=15)
    assert tally.cases == 300 + len(issue_cases()) and tally.fixed == len(issue_cases())
    assert tally.unbuildable == 0, tally.failures  # every generated reply was a real Flower message
    assert (tally.crashes, tally.silent_accepts, tally.false_rejects) == (0, 0, 0), tally.failures
    assert (tally.ledger_overwrites, tally.bad_signals) == (0, 0), tally.failures
    assert all(row["rejected"] and not row["crash"] for row in tally.fixed_seeds), tally.fixed_seeds
    assert tally.accepted >= 20 and tally.rejected >= 200  # both sides of the rule were exercised


# ---- config parsing ----

SECTIONS = {f.name: get_type_hints(RunConfig)[f.name] for f in fields(RunConfig)}
LEAVES: dict[str, type] = {}  # "fleet.num_clients" -> int, "rounds" -> int, ...
for _name, _typ in SECTIONS.items():
    if dataclasses.is_dataclass(_typ):
        LEAVES.update({f"{_name}.{k}": t for k, t in get_type_hints(_typ).items()})
    else:
        LEAVES[_name] = _typ

# The documented values of every choice key (README / config comments), stated here, not read from config.py.
ATTACKS = ("label-flip", "random", "scaled", "nan", "wrong-shape")
KEY_CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("feddistill", "fedavg", "dp-fedavg"),
    "data.dataset": ("digits", "fashion-mnist"),
    "fleet.partition": ("iid", "dirichlet", "shards"),
    "fleet.sampling": ("poisson", "fixed"),
    "fleet.students": (*MODEL_NAMES, ",".join(MODEL_NAMES[:2]), " mlp , mlp "),
    "teacher.model": MODEL_NAMES,
    "distill.aggregator": ("mean", "era", "median", "trimmed-mean", "outlier-filtered"),
    "distill.answer_dtype": ("float32", "float16", "uint8", "vote"),
    "distill.client_start": ("global", "own"),
    "distill.server_student": MODEL_NAMES,
    "baselines.fedavg_init": ("public", "scratch"),
    "privacy.client_level": ("off", "local", "central", "gnmax", "confident-gnmax"),
    "privacy.bound": ("probs", "votes", "clipped_logits"),
    "scenario.attack": ATTACKS,
}
NEAR_MISSES = {"mlp,", "mlp,resnet", "", "x", "MEAN", "clipped-logits"}
CHOICES = sorted({c for cs in KEY_CHOICES.values() for c in cs} | NEAR_MISSES)


SCALARS = st.one_of(
    st.integers(-5, 2000),
    st.integers(-(2**63), 2**63),
    st.floats(allow_infinity=False),  # Inf: see test_non_finite_floats_are_rejected
    st.floats(-2.0, 2.0),
    st.booleans(),
    st.sampled_from(CHOICES),
    st.text(max_size=6),
)
ANY_VALUE = st.recursive(SCALARS, lambda inner: st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)

# Values of the right type near the interesting edges (so that many configs are accepted).
PLAUSIBLE = {
    bool: st.booleans(),
    int: st.one_of(st.integers(0, 5), st.integers(-2, 1000)),
    float: st.one_of(st.sampled_from([0.0, 1e-6, 0.1, 0.5, 1.0, 2.0]), st.floats(-0.5, 50.0), st.integers(0, 3)),
    str: st.sampled_from(CHOICES),
}
# ... and of a near-miss type (bool for int, "5" for int, 1 for bool, 3.0 for int ...).
WRONG_TYPE = {
    bool: st.sampled_from([0, 1, "true", 1.0]),
    int: st.one_of(st.booleans(), st.sampled_from([3.0, "5", 1.5])),
    float: st.one_of(st.booleans(), st.sampled_from(["0.5", "inf"])),
    str: st.one_of(st.integers(0, 3), st.booleans(), st.just(["mlp"])),
}
LEAF_VALUES = {
    dotted: st.one_of(
        st.sampled_from(KEY_CHOICES[dotted]) if dotted in KEY_CHOICES else PLAUSIBLE[typ],
        PLAUSIBLE[typ],
        WRONG_TYPE[typ],
        ANY_VALUE,
    )
    for dotted, typ in LEAVES.items()
}
# Keys that take part in a cross-key rule get edited more often.
LINKED_KEYS = (
    "data.reference_size",
    "data.public_labelled_size",
    "distill.query_size",
    "data.dataset",
    "data.test_size",
    "fleet.num_clients",
    "audit.canary_client",
    "fleet.sampling",
    "fleet.fraction",
    "fleet.students",
    "privacy.client_level",
    "privacy.bound",
    "privacy.noise_multiplier",
    "privacy.target_epsilon",
    "privacy.gnmax_threshold",
    "privacy.threshold_noise_multiplier",
    "privacy.record_level",
    "privacy.record_noise_multiplier",
    "privacy.record_target_epsilon",
    "distill.revisit_epochs",
    "method",
    "baselines.dp_fedavg",
    "scenario.hostile_fraction",
)
UNKNOWN_KEYS = st.one_of(st.text(max_size=8), st.sampled_from(["fleet.colour", "colour", "a.b.c", ".x", "x."]))
EDITS = st.sampled_from(["known"] * 6 + ["unknown", "section"])
NEAR_VALID = {
    dotted: st.one_of(st.sampled_from(KEY_CHOICES[dotted]), st.sampled_from(CHOICES))
    if dotted in KEY_CHOICES
    else PLAUSIBLE[typ]
    for dotted, typ in LEAVES.items()
}


SECTION_NAMES = st.sampled_from(sorted(SECTIONS))
LEAF_NAMES = st.one_of(st.sampled_from(sorted(LEAVES)), st.sampled_from(LINKED_KEYS))


def _spell(dotted: str, dashes: bool) -> str:
    return dotted.replace("_", "-") if dashes else dotted


@st.composite
def config_inputs(draw) -> dict[str, Any]:
    """A flat (Flower) or nested (TOML) dict: defaults or nothing, then a few random edits.

    "near-valid" inputs edit known keys with values of the right type (they probe the range
    and cross-key rules); "wild" ones add unknown keys, tables for values and values of any type.
    """
    wild = draw(st.sampled_from([False, True, True]))
    flat = draw(st.booleans())
    values: dict[str, Any] = {}
    if draw(st.booleans()):
        values = RunConfig().to_flat() if flat else RunConfig().to_dict()
    for _ in range(draw(st.sampled_from([1, 1, 2, 2, 3, 4, 6]))):
        kind = draw(EDITS) if wild else "known"
        if kind == "unknown":
            values[draw(UNKNOWN_KEYS)] = draw(ANY_VALUE)
            continue
        if kind == "section":
            values[draw(SECTION_NAMES)] = draw(ANY_VALUE)
            continue
        dotted = draw(LEAF_NAMES)
        value = draw((LEAF_VALUES if wild else NEAR_VALID)[dotted])
        key = _spell(dotted, draw(st.booleans()))
        section, _, sub = key.rpartition(".")
        if flat or not section:
            values[key] = value
        else:
            table = values.get(section)
            if not isinstance(table, dict):
                table = values[section] = {}
            table[sub] = value
    return values


def _check_invariants(cfg: RunConfig) -> None:
    """Every documented constraint on a RunConfig, stated independently of config.py."""
    for dotted, typ in LEAVES.items():
        section, _, name = dotted.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        assert type(value) is typ, (dotted, value)  # exactly: no bool for int, no int for float
        if typ is float:
            assert math.isfinite(value), (dotted, value)
        if dotted in KEY_CHOICES and dotted != "fleet.students":
            assert value in KEY_CHOICES[dotted], (dotted, value)
    d, f, t, s, p, b = cfg.data, cfg.fleet, cfg.teacher, cfg.distill, cfg.privacy, cfg.baselines
    assert cfg.rounds >= 1 and d.test_size >= 0 and (d.test_size >= 1 or d.dataset != "digits")
    assert 1 <= s.query_size <= d.reference_size and 1 <= d.public_labelled_size <= d.reference_size
    assert f.num_clients >= 1 and 0 < f.fraction <= 1 and f.alpha > 0 and f.shards_per_client >= 1
    assert cfg.student_names and all(name in MODEL_NAMES for name in cfg.student_names)
    assert t.epochs >= 0 and t.lr > 0 and t.batch_size >= 1
    assert s.era_temperature > 0 and s.temperature > 0 and s.lr > 0 and s.server_lr > 0 and 0 <= s.momentum <= 1
    assert s.batch_size >= 1 and min(s.digest_epochs, s.revisit_epochs, s.server_epochs, s.revisit_kd_weight) >= 0
    assert b.max_local_clients >= 1 and b.local_epochs >= 1 and b.fedavg_local_epochs >= 1
    assert cfg.simulation.cpus_per_client > 0 and cfg.simulation.round_timeout > 0
    assert cfg.simulation.node_wait_timeout > 0
    assert cfg.audit.canaries >= 0 and 0 <= cfg.audit.canary_client < f.num_clients
    assert p.clip_norm > 0 and p.max_grad_norm > 0 and 0 < p.delta <= 0.1 and 0 < p.record_delta <= 0.1
    assert (
        min(
            p.noise_multiplier,
            p.target_epsilon,
            p.gnmax_threshold,
            p.threshold_noise_multiplier,
            p.record_noise_multiplier,
            p.record_target_epsilon,
            p.record_participations,
        )
        >= 0
    )
    calibrated = p.noise_multiplier > 0 or p.target_epsilon > 0
    if p.client_level != "off":
        assert calibrated and f.sampling == "poisson"
    if p.client_level in ("gnmax", "confident-gnmax"):
        assert p.bound == "votes"
    if p.client_level == "confident-gnmax":
        assert p.gnmax_threshold > 0 and p.threshold_noise_multiplier > 0
    if p.record_level:
        assert (p.record_noise_multiplier > 0 or p.record_target_epsilon > 0) and s.revisit_epochs >= 1
    if hasattr(b, "dp_fedavg"):  # DP-FedAvg (method or baseline) needs its noise calibrated too
        assert b.dp_fedavg_clip > 0 and (calibrated or not (cfg.method == "dp-fedavg" or b.dp_fedavg))
    if hasattr(cfg, "scenario"):
        assert 0 <= cfg.scenario.hostile_fraction <= 1 and 0 <= cfg.scenario.dropout <= 1


def _given_once(values: dict[str, Any]) -> dict[str, Any]:
    """{"fleet.num_clients": 3, ...} for the leaves set exactly once in the input (any spelling, flat or nested)."""
    seen: dict[str, list[Any]] = {}
    for key, value in values.items():
        pairs = value.items() if isinstance(value, dict) and "." not in key else [(None, value)]
        for sub, v in pairs:
            dotted = (f"{key}.{sub}" if sub is not None else key).replace("-", "_")
            seen.setdefault(dotted, []).append(v)
    return {k: v[0] for k, v in seen.items() if len(v) == 1 and k in LEAVES}


@settings(max_examples=1000, **FAST)
@given(config_inputs())
def test_parse_config_returns_a_valid_runconfig_or_raises_configerror(values):
    try:
        cfg = parse_config(values, "fuzz")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz"), exc  # the message names its source
        return
    assert isinstance(cfg, RunConfig)
    _check_invariants(cfg)
    assert parse_config(cfg.to_flat(), "flat") == cfg  # an accepted config survives Flower's run-config form
    for dotted, value in _given_once(values).items():  # what was asked for is what was built
        section, _, name = dotted.rpartition(".")
        assert getattr(getattr(cfg, section) if section else cfg, name) == value, dotted


# The privacy rules tie several keys together; this draws all of them at once, each from a few values.
PRIVACY_KEYS = {
    "privacy.client-level": st.sampled_from(KEY_CHOICES["privacy.client_level"]),
    "privacy.bound": st.sampled_from(KEY_CHOICES["privacy.bound"]),
    "privacy.noise-multiplier": st.sampled_from([0.0, 1.0]),
    "privacy.target-epsilon": st.sampled_from([0.0, 4.0]),
    "privacy.gnmax-threshold": st.sampled_from([0.0, 3.0]),
    "privacy.threshold-noise-multiplier": st.sampled_from([0.0, 2.0]),
    "privacy.record-level": st.booleans(),
    "privacy.record-noise-multiplier": st.sampled_from([0.0, 1.0]),
    "privacy.record-target-epsilon": st.sampled_from([0.0, 8.0]),
    "fleet.sampling": st.sampled_from(KEY_CHOICES["fleet.sampling"]),
    "distill.revisit-epochs": st.sampled_from([0, 1]),
    "method": st.sampled_from(KEY_CHOICES["method"]),
}
if "baselines.dp_fedavg" in LEAVES:
    PRIVACY_KEYS["baselines.dp-fedavg"] = st.booleans()


@settings(max_examples=400, **FAST)
@given(st.fixed_dictionaries({}, optional=PRIVACY_KEYS))
def test_privacy_rules_hold_for_every_combination(values):
    try:
        cfg = parse_config(values, "fuzz")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz"), exc
        return
    _check_invariants(cfg)


@settings(max_examples=200, **FAST)
@given(st.dictionaries(st.text(max_size=12), ANY_VALUE, max_size=6))
def test_parse_config_of_arbitrary_dicts_never_crashes(values):
    try:
        _check_invariants(parse_config(values, "fuzz"))
    except ConfigError:
        pass


def test_huge_int_for_a_float_key_is_a_config_error():
    with pytest.raises(ConfigError):
        parse_config({"fleet.alpha": 10**400}, "fuzz")


@pytest.mark.parametrize("key", ["teacher.lr", "distill.temperature", "privacy.clip-norm", "privacy.noise-multiplier"])
def test_non_finite_floats_are_rejected(key):
    with pytest.raises(ConfigError):
        parse_config({key: math.inf}, "fuzz")
