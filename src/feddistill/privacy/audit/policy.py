"""The audit policy: thresholds a privacy officer sets, and the verdict against them.

A policy is a small TOML file; every key is optional::

    max_auc = 0.6                  # best attack's ROC AUC, over every target
    max_tpr_at_0_1pct_fpr = 0.01   # best attack's TPR at 0.1 % FPR
    max_tpr_at_1pct_fpr = 0.05     # best attack's TPR at 1 % FPR
    max_empirical_epsilon = 2.0    # largest empirical epsilon lower bound (attacks and canaries)
    fail_on_dp_violation = true    # an empirical lower bound above the claimed epsilon fails (default)
    min_label_tv = 0.1             # label-distribution inference: the attacker's TV error must stay >= this

Label-distribution inference is measured by the total-variation distance between the
attacker's estimate and the client's true label histogram, so *smaller* TV means *more*
leakage: the bound is a minimum. ``max_label_tv`` is rejected with that explanation
rather than silently read the wrong way round.

Without a policy file only ``fail_on_dp_violation = true`` applies: a DP violation is
never smoothed over.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .artifacts import AuditInputError

__all__ = ["AuditPolicy", "load_policy", "evaluate_policy"]


@dataclass(frozen=True)
class AuditPolicy:
    max_auc: float | None = None
    max_tpr_at_0_1pct_fpr: float | None = None
    max_tpr_at_1pct_fpr: float | None = None
    max_empirical_epsilon: float | None = None
    fail_on_dp_violation: bool = True
    min_label_tv: float | None = None
    source: str = "default (fail_on_dp_violation = true)"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_RATES = ("max_auc", "max_tpr_at_0_1pct_fpr", "max_tpr_at_1pct_fpr", "min_label_tv")


def load_policy(path: str | Path | None) -> AuditPolicy:
    """Read a TOML policy file (None = the default policy). Unknown keys, wrong types and
    impossible values raise :class:`AuditInputError`."""
    if path is None:
        return AuditPolicy()
    p = Path(path)
    if not p.is_file():
        raise AuditInputError(f"{p}: policy file not found")
    try:
        values = tomllib.loads(p.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AuditInputError(f"{p}: not a readable TOML policy ({exc})") from exc
    known = {f.name for f in fields(AuditPolicy)} - {"source"}
    kwargs: dict[str, Any] = {}
    for raw, value in values.items():
        key = raw.replace("-", "_")
        if key == "max_label_tv":
            raise AuditInputError(
                f"{p}: 'max_label_tv' is ambiguous: the label-inference TV is the attacker's error, so a "
                "smaller TV means more leakage; use 'min_label_tv' (fail when any client's TV is below it)"
            )
        if key not in known:
            raise AuditInputError(f"{p}: unknown policy key {raw!r} (valid: {', '.join(sorted(known))})")
        if key == "fail_on_dp_violation":
            if not isinstance(value, bool):
                raise AuditInputError(f"{p}: '{raw}' must be true or false, got {value!r}")
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise AuditInputError(f"{p}: '{raw}' must be a finite number >= 0, got {value!r}")
            if key in _RATES and value > 1:
                raise AuditInputError(f"{p}: '{raw}' is a rate/distance in [0, 1], got {value!r}")
            value = float(value)
        kwargs[key] = value
    return AuditPolicy(**kwargs, source=str(p))


def _rule(name: str, passed: bool, observed: Any, limit: Any, detail: str) -> dict[str, Any]:
    return {"rule": name, "passed": bool(passed), "observed": observed, "limit": limit, "detail": detail}


def _worst(
    targets: dict[str, Any], getter: Callable[[dict[str, Any]], Any], larger_is_worse: bool = True
) -> tuple[float | None, str]:
    """The worst value ``getter`` reads over every attack of every target not skipped, and where."""
    best_v, where = None, ""
    for tname, t in targets.items():
        if t.get("skipped"):
            continue
        for aname, a in t.get("attacks", {}).items():
            v = getter(a)
            if v is None:
                continue
            if best_v is None or (v > best_v if larger_is_worse else v < best_v):
                best_v, where = v, f"{tname} / {aname}"
    return best_v, where


def evaluate_policy(audit: dict[str, Any], policy: AuditPolicy) -> tuple[list[dict[str, Any]], int]:
    """Check an audit dict (as :func:`runner.run_audit` builds it) against ``policy``.

    Returns ``(rules, exit_code)``: one entry per rule that applies, and 0 when all pass,
    1 otherwise. ``observed`` is the worst value over all targets (or clients)."""
    rules: list[dict[str, Any]] = []
    targets = audit.get("targets", {})
    for key, label, get in (
        ("max_auc", "ROC AUC", lambda a: a["summary"]["auc"]),
        ("max_tpr_at_0_1pct_fpr", "TPR at 0.1 % FPR", lambda a: a["summary"]["tpr_at_fpr"]["0.001"]["tpr"]),
        ("max_tpr_at_1pct_fpr", "TPR at 1 % FPR", lambda a: a["summary"]["tpr_at_fpr"]["0.01"]["tpr"]),
    ):
        limit = getattr(policy, key)
        if limit is None:
            continue
        v, where = _worst(targets, get)
        if v is None:
            rules.append(_rule(key, True, None, limit, f"no attack was scored, so {label} could not be checked"))
            continue
        rules.append(_rule(key, v <= limit, v, limit, f"worst {label} {v:.4g} ({where}); limit {limit:g}"))

    bounds = audit.get("epsilon_lower_bounds", [])
    if policy.max_empirical_epsilon is not None:
        if bounds:
            top = max(bounds, key=lambda b: b["epsilon_lower_bound"])
            v = top["epsilon_lower_bound"]
            rules.append(
                _rule(
                    "max_empirical_epsilon",
                    v <= policy.max_empirical_epsilon,
                    v,
                    policy.max_empirical_epsilon,
                    f"largest empirical epsilon lower bound {v:.4g} ({top['source']}); "
                    f"limit {policy.max_empirical_epsilon:g}",
                )
            )
        else:
            rules.append(
                _rule("max_empirical_epsilon", True, None, policy.max_empirical_epsilon, "no epsilon bound computed")
            )

    if policy.fail_on_dp_violation:
        violations = audit.get("dp_violations", [])
        claimed = [b for b in bounds if b.get("claimed_epsilon") is not None]
        if not claimed:
            detail = "the run claims no differential privacy; nothing to violate"
        elif violations:
            detail = "; ".join(
                f"{v['source']}: empirical lower bound {v['epsilon_lower_bound']:.4g} "
                f"> claimed epsilon {v['claimed_epsilon']:.4g}"
                for v in violations
            )
        else:
            detail = f"all {len(claimed)} empirical lower bounds are at or below the claimed epsilon"
        rules.append(_rule("fail_on_dp_violation", not violations, len(violations), 0, detail))

    if policy.min_label_tv is not None:
        li = audit.get("label_inference", {}).get("clients", {})
        if li:
            pid, row = min(li.items(), key=lambda kv: kv[1]["tv"])
            v = row["tv"]
            rules.append(
                _rule(
                    "min_label_tv",
                    v >= policy.min_label_tv,
                    v,
                    policy.min_label_tv,
                    f"smallest TV between a client's uploads-based label estimate and its true labels {v:.4g} "
                    f"(client {pid}); limit >= {policy.min_label_tv:g}",
                )
            )
        else:
            rules.append(_rule("min_label_tv", True, None, policy.min_label_tv, "no client uploaded"))
    code = 0 if all(r["passed"] for r in rules) else 1
    return rules, code
