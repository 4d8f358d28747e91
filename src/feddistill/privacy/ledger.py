"""One privacy ledger, kept by the server (unit "client") and by every device (unit "record").

The ledger's whole state is plain data: its settings and an append-only list of
:class:`LedgerEntry` (a :class:`~feddistill.privacy.accounting.GaussianEvent`
plus the round it was spent in). ε is always recomputed from that history by a
maintained accountant (PLD by default), never stored, so a saved ledger can be
re-audited with another accountant. Budgets are enforced: :meth:`PrivacyLedger.record`
refuses an event that would take ε above the target.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feddistill.atomic import atomic_path

from .accounting import ACCOUNTANTS, GaussianEvent, check_neighbouring, epsilon
from .mechanisms import NEIGHBOURING

__all__ = ["UNITS", "BudgetExceeded", "LedgerFileError", "LedgerEntry", "PrivacyLedger"]

#: Privacy units: one private example on a device, or one whole client of the fleet.
UNITS = ("record", "client")

_FORMAT = "feddistill.privacy_ledger"
_VERSION = 1


class BudgetExceeded(RuntimeError):
    """Spending an event would take the ledger's ε above its target."""

    def __init__(self, message: str, *, epsilon_spent: float, epsilon_after: float, target_epsilon: float):
        super().__init__(message)
        self.epsilon_spent = epsilon_spent
        self.epsilon_after = epsilon_after
        self.target_epsilon = target_epsilon


class LedgerFileError(ValueError):
    """A saved ledger could not be read back (corrupt, truncated or not a ledger)."""


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded spend: the mechanism's event, the round, and (for the record) its sensitivity.

    ``sensitivity`` is informational — it is already folded into
    ``event.noise_multiplier`` — and lets a reader reproduce the noise std
    (``noise_multiplier × sensitivity``).
    """

    event: GaussianEvent
    round: int
    sensitivity: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.event, GaussianEvent):
            raise ValueError(f"event must be a GaussianEvent, got {type(self.event).__name__}")
        if isinstance(self.round, bool) or int(self.round) != self.round or self.round < 0:
            raise ValueError(f"round must be an integer >= 0, got {self.round!r}")
        object.__setattr__(self, "round", int(self.round))
        if self.sensitivity is not None:
            s = self.sensitivity
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s > 0):
                raise ValueError(f"sensitivity must be a finite number > 0 or None, got {s!r}")
            object.__setattr__(self, "sensitivity", float(s))

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "sensitivity": self.sensitivity, **self.event.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LedgerEntry:
        return cls(event=GaussianEvent.from_dict(d), round=d["round"], sensitivity=d.get("sensitivity"))


@dataclass
class PrivacyLedger:
    """Privacy spent so far, for one privacy unit, with an enforced target.

    Parameters
    ----------
    unit:
        ``"record"`` (a device's DP-SGD ledger: one private example) or
        ``"client"`` (the server's ledger of uploads: one whole client).
    delta:
        The δ every ε is reported at, in (0, 1).
    target_epsilon:
        Budget; ``None`` means report only (no enforcement).
    mechanism:
        What is being accounted, e.g. ``"dp-sgd"``, ``"gaussian-replies/probs"``,
        ``"gnmax"``; printed next to every ε.
    accountant:
        One of :data:`~feddistill.privacy.accounting.ACCOUNTANTS`; ``"pld"`` by default.
    neighbouring:
        ``"add/remove"`` or ``"replace-one"``; must match the relation the
        sensitivities folded into the events were derived for.
    history:
        Append-only list of :class:`LedgerEntry`.
    """

    unit: str
    delta: float
    target_epsilon: float | None
    mechanism: str
    accountant: str = "pld"
    neighbouring: str = "add/remove"
    history: list[LedgerEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")
        d = self.delta
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (0 < d < 1):
            raise ValueError(f"delta must be in (0, 1), got {d!r}")
        self.delta = float(d)
        t = self.target_epsilon
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
                raise ValueError(f"target_epsilon must be a finite number > 0 or None, got {t!r}")
            self.target_epsilon = float(t)
        if not isinstance(self.mechanism, str) or not self.mechanism:
            raise ValueError(f"mechanism must be a non-empty string, got {self.mechanism!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.neighbouring not in NEIGHBOURING:
            raise ValueError(f"neighbouring must be one of {NEIGHBOURING}, got {self.neighbouring!r}")
        self.history = list(self.history)
        for i, entry in enumerate(self.history):
            if not isinstance(entry, LedgerEntry):
                raise ValueError(f"history[{i}] must be a LedgerEntry, got {type(entry).__name__}")
        check_neighbouring(self._events(), self.neighbouring)

    # ---- ε ---------------------------------------------------------------------------
    # Every ε goes through accounting.epsilon, which caches on the event multiset:
    # repeated epsilon()/can_afford()/record() calls on the same history cost one
    # accountant run.

    def _events(self) -> list[GaussianEvent]:
        return [e.event for e in self.history]

    def _epsilon_of(self, events: list[GaussianEvent], accountant: str | None = None) -> float:
        return epsilon(
            events,
            self.delta,
            accountant=accountant or self.accountant,
            neighbouring=self.neighbouring,
        )

    def epsilon(self) -> float:
        """ε spent so far at :attr:`delta` by :attr:`accountant` (0.0 for an empty history)."""
        return self._epsilon_of(self._events())

    def epsilon_rdp(self) -> float:
        """ε by dp-accounting's RDP accountant, as a cross-check (RDP ≥ PLD in practice)."""
        return self._epsilon_of(self._events(), "rdp")

    def epsilon_if(self, event: GaussianEvent) -> float:
        """ε after also spending ``event`` (nothing is recorded)."""
        if not isinstance(event, GaussianEvent):
            raise TypeError(f"event must be a GaussianEvent, got {type(event).__name__}")
        return self._epsilon_of([*self._events(), event])

    def can_afford(self, event: GaussianEvent) -> bool:
        """Whether ``event`` keeps ε within the target (always True without a target)."""
        if self.target_epsilon is None:
            return True
        return self.epsilon_if(event) <= self.target_epsilon

    def record(self, event: GaussianEvent, round: int, sensitivity: float | None = None) -> None:
        """Append ``event`` spent in ``round``; raise :class:`BudgetExceeded` (and record nothing) if over target."""
        entry = LedgerEntry(event=event, round=round, sensitivity=sensitivity)
        check_neighbouring([event], self.neighbouring)
        if self.target_epsilon is not None:
            after = self.epsilon_if(event)
            if after > self.target_epsilon:
                spent = self.epsilon()
                raise BudgetExceeded(
                    f"{self.unit}-level budget exceeded: round {round} would take ε from "
                    f"{spent:.4f} to {after:.4f} > target {self.target_epsilon:g} "
                    f"(δ={self.delta:g}, {self.accountant}, {self.neighbouring}, {self.mechanism})",
                    epsilon_spent=spent,
                    epsilon_after=after,
                    target_epsilon=self.target_epsilon,
                )
        self.history.append(entry)

    # ---- reporting -------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Everything needed to read and reproduce the ε: settings, uniform parameters, per-round history."""
        events = self._events()
        uniform = len({(e.noise_multiplier, e.sampling_rate) for e in events}) == 1
        rows = []
        for i, entry in enumerate(self.history):
            rows.append({**entry.to_dict(), "cumulative_epsilon": self._epsilon_of(events[: i + 1])})
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "unit": self.unit,
            "neighbouring": self.neighbouring,
            "mechanism": self.mechanism,
            "accountant": self.accountant,
            "target_epsilon": self.target_epsilon,
            "noise_multiplier": events[0].noise_multiplier if uniform else None,
            "sampling_rate": events[0].sampling_rate if uniform else None,
            "steps": sum(e.steps for e in events) if uniform else None,
            "history": rows,
        }

    # ---- persistence -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "unit": self.unit,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "mechanism": self.mechanism,
            "accountant": self.accountant,
            "neighbouring": self.neighbouring,
            "history": [e.to_dict() for e in self.history],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyLedger:
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} document")
        if d.get("version") != _VERSION:
            # never start a new ledger instead: that would forget the privacy this one has spent
            raise ValueError(
                f"unsupported ledger version {d.get('version')!r} (expected {_VERSION}): written by "
                "another feddistill version; read it with that version, do not delete it (a new "
                "ledger would forget the privacy already spent)"
            )
        return cls(
            unit=d["unit"],
            delta=d["delta"],
            target_epsilon=d["target_epsilon"],
            mechanism=d["mechanism"],
            accountant=d["accountant"],
            neighbouring=d["neighbouring"],
            history=[LedgerEntry.from_dict(e) for e in d["history"]],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> PrivacyLedger:
        return cls.from_dict(json.loads(s))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically and durably: a crash leaves the old ledger or the new one, never a torn file."""
        with atomic_path(path, durable=True) as tmp:
            tmp.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read a ledger written by :meth:`save`; :class:`LedgerFileError` names the path if it is corrupt."""
        path = Path(path)
        raw = path.read_bytes()  # FileNotFoundError already names the path
        try:
            return cls.from_json(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise LedgerFileError(f"privacy ledger file {str(path)!r} is corrupt or not a ledger: {exc}") from exc
