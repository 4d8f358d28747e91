"""Versioned releases of the global student: the validation gate, rollback, the history on disk.

Every round's distilled global student is a *candidate* with an id (``r0003`` = round 3;
``r0000`` is the round-0 student distilled from the public teacher alone, the first
release). The gate compares it with the current release on the public validation split
and the current teacher signal; it is promoted only if it does not regress beyond the
configured tolerances, otherwise the current release stays (a rollback of the round's
candidate), and the reason is recorded either way.

The validation split is a held-out part of the *labelled public sample*: the server owns
those labels, and the public teacher is trained only on the rest of the sample (so the
teacher signal on these rows does not encode their labels either). Their inputs are
reference-set rows like any other (clients and the server distil on them with the teacher
signal as the only target); their labels are read by nothing but the gate and the
temperature scaling. Private data and the test split never reach either.

On disk (written atomically; ``feddistill releases`` / ``feddistill export`` read them)::

    RUN_DIR/releases/index.json     every candidate: id, parent, status, reason, metrics, epsilon
    RUN_DIR/releases/<id>.pt        each promoted student: {"model", "state_dict", "temperature", "release"}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from feddistill.atomic import atomic_path
from feddistill.config import ReleaseConfig, RunConfig
from feddistill.runfolder import RunFolder

PROMOTED, REJECTED = "promoted", "rejected"


class ReleaseError(RuntimeError):
    """A run folder has no release history, or not the asked-for release."""


def release_id(rnd: int) -> str:
    return f"r{rnd:04d}"


@dataclass(frozen=True)
class GateMetrics:
    """What the gate compares: on the public validation split, and agreement with the current
    teacher signal on the reference set."""

    accuracy: float
    ece: float
    nll: float
    agreement: float


@dataclass
class Release:
    id: str
    round: int
    parent: str | None  # the release that was current when this candidate was distilled
    status: str  # "promoted" | "rejected"
    reason: str
    reference_digest: str
    config_digest: str
    model: str
    validation: dict[str, float]  # GateMetrics of the candidate
    test: dict[str, float]  # accuracy / nll / ece on the test split: reported, never gated on
    client_epsilon: float | None  # client-level epsilon spent when this candidate was made
    record_epsilon: float | None  # largest device record-level epsilon reported by then (None if none)
    calibration: dict[str, Any] | None = None  # temperature scaling (promoted releases only)
    path: str | None = None  # relative to the run folder; promoted releases only

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Release:
        return cls(**d)


def gate_decision(
    candidate: GateMetrics, current: GateMetrics | None, cfg: ReleaseConfig, current_id: str | None = None
) -> tuple[bool, str]:
    """Promote (True) or keep the current release (False), with the reason in words."""
    if current is None:
        return True, "first release"
    if not cfg.gate:
        return True, "gate off: every candidate is released"
    name = current_id or "the current release"
    checks = [
        (
            "validation accuracy",
            candidate.accuracy,
            current.accuracy - cfg.accuracy_tolerance,
            ">=",
            f"{name}'s {current.accuracy:.3f} - tolerance {cfg.accuracy_tolerance:g}",
        ),
        (
            "validation ECE",
            candidate.ece,
            current.ece + cfg.ece_tolerance,
            "<=",
            f"{name}'s {current.ece:.3f} + tolerance {cfg.ece_tolerance:g}",
        ),
        (
            "agreement with the teacher signal",
            candidate.agreement,
            current.agreement - cfg.agreement_tolerance,
            ">=",
            f"{name}'s {current.agreement:.3f} - tolerance {cfg.agreement_tolerance:g}",
        ),
    ]
    failed = []
    for what, value, bound, op, against in checks:
        ok = value >= bound - 1e-12 if op == ">=" else value <= bound + 1e-12
        if not ok:
            failed.append(f"{what} {value:.3f} {'<' if op == '>=' else '>'} {against}")
    if failed:
        return False, "regression: " + "; ".join(failed) + f"; {name} stays released"
    return True, (
        f"no regression beyond tolerance against {name} (validation accuracy {candidate.accuracy:.3f}, "
        f"ECE {candidate.ece:.3f}, agreement {candidate.agreement:.3f})"
    )


@dataclass
class ReleaseHistory:
    """Every candidate in order, and which one is released now."""

    releases: list[Release] = field(default_factory=list)
    current: str | None = None

    def get(self, rid: str) -> Release:
        for r in self.releases:
            if r.id == rid:
                return r
        raise KeyError(rid)

    @property
    def current_release(self) -> Release | None:
        return None if self.current is None else self.get(self.current)

    def add(self, release: Release) -> None:
        self.releases = [r for r in self.releases if r.id != release.id]  # a re-run round replaces its candidate
        self.releases.append(release)
        if release.status == PROMOTED:
            self.current = release.id

    @property
    def promoted(self) -> list[Release]:
        return [r for r in self.releases if r.status == PROMOTED]

    @property
    def rollbacks(self) -> list[Release]:
        return [r for r in self.releases if r.status == REJECTED]

    def to_dict(self) -> dict[str, Any]:
        return {"current": self.current, "releases": [asdict(r) for r in self.releases]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReleaseHistory:
        return cls(releases=[Release.from_dict(r) for r in d.get("releases", [])], current=d.get("current"))


def save_release_model(run_dir: Path, release: Release, state_dict: dict[str, Any], temperature: float) -> str:
    """Write a promoted student to ``releases/<id>.pt``; returns its path relative to the run."""
    import torch

    rel = RunFolder.release_file(release.id)
    with atomic_path(Path(run_dir) / rel) as tmp:
        torch.save(
            {
                "model": release.model,
                "state_dict": state_dict,
                "temperature": float(temperature),
                "release": release.id,
            },
            tmp,
        )
    return rel


def save_index(run_dir: Path, history: ReleaseHistory) -> Path:
    path = RunFolder(Path(run_dir)).release_index
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(history.to_dict(), indent=2))
    return path


def load_index(run_dir: Path) -> ReleaseHistory:
    path = RunFolder(Path(run_dir)).release_index
    if not Path(run_dir).is_dir():
        raise ReleaseError(f"{run_dir}: no such run folder")
    if not path.is_file():
        raise ReleaseError(
            f"{path}: not found; {run_dir} has no release history (is it the folder of a finished feddistill run?)"
        )
    try:
        return ReleaseHistory.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as exc:
        raise ReleaseError(f"{path}: corrupt release index ({exc})") from exc


def load_release_model(run_dir: Path, rid: str) -> tuple[Release, dict[str, Any]]:
    """The release's metadata and its saved blob; a clear ReleaseError for an unknown id, a
    rejected candidate (never released) or a missing/corrupt file."""
    import torch

    history = load_index(run_dir)
    try:
        release = history.get(rid)
    except KeyError:
        known = ", ".join(r.id for r in history.promoted) or "none"
        raise ReleaseError(
            f"{RunFolder(Path(run_dir)).release_index}: no release {rid!r} (released: {known})"
        ) from None
    if release.status != PROMOTED or not release.path:
        raise ReleaseError(f"{rid} was a candidate the gate rejected, never released ({release.reason})")
    path = Path(run_dir) / release.path
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ReleaseError(f"{path}: cannot read release {rid} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict) or "state_dict" not in blob or "model" not in blob:
        raise ReleaseError(f"{path}: not a release file (needs keys 'model' and 'state_dict')")
    return release, blob


@dataclass(frozen=True)
class Predictions:
    """A candidate's outputs the server computed this round anyway (its test metrics and
    agreement), handed to the gate so that it does not run the same inference again."""

    reference_labels: Any  # argmax over the reference set
    test_logits: Any


class Releaser:
    """The server's release manager: evaluates each round's candidate, gates it, calibrates and
    stores promoted ones, and remembers the released student (what devices deploy)."""

    def __init__(
        self,
        run_dir: Path,
        cfg: RunConfig,
        *,
        reference_digest: str,
        model_name: str,
        validation: tuple[Any, Any],
        reference_x: Any,
        test: tuple[Any, Any],
        history: ReleaseHistory | None = None,
        released_state: dict[str, Any] | None = None,
        released_temperature: float = 1.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.reference_digest = reference_digest
        self.model_name = model_name
        self.val_x, self.val_y = validation  # torch tensor, numpy labels (may be empty)
        self.ref_x = reference_x
        self.test_x, self.test_y = test
        self.history = history or ReleaseHistory()
        self.released_state = released_state
        self.released_temperature = released_temperature
        # the released student's outputs do not change while it stays released: kept from
        # when it was promoted (recomputed once after a resume), not re-inferred every round
        self._released_outputs: tuple[Any, Any] | None = None

    # ---- evaluation ----
    def _outputs(self, model: Any, reference_labels: Any = None) -> tuple[Any, Any]:
        """(argmax on the reference set, logits on the validation split or None without one)."""
        from feddistill.training import predict_logits

        if reference_labels is None:
            reference_labels = predict_logits(model, self.ref_x).numpy().argmax(1)
        return reference_labels, predict_logits(model, self.val_x).numpy() if len(self.val_y) else None

    def _gate_metrics(self, outputs: tuple[Any, Any], signal: Any) -> GateMetrics:
        import numpy as np

        from feddistill.training import evaluate_probs

        reference_labels, val_logits = outputs
        agreement = float((reference_labels == signal.argmax(1)).mean())
        if len(self.val_y) == 0:
            return GateMetrics(float("nan"), float("nan"), float("nan"), agreement)
        ev = evaluate_probs(np.asarray(_softmax(val_logits)), self.val_y)
        return GateMetrics(ev.accuracy, ev.ece, ev.nll, agreement)

    def released_model(self, build: Any) -> Any:
        """A fresh model (from `build()`) holding the released weights."""
        model = build()
        model.load_state_dict(self.released_state)
        return model

    # ---- one round ----
    def consider(
        self,
        rnd: int,
        model: Any,
        signal: Any,
        *,
        test_metrics: dict[str, float],
        client_epsilon: float | None,
        record_epsilon: float | None,
        build: Any,
        predictions: Predictions | None = None,
    ) -> dict[str, Any]:
        """Gate round `rnd`'s candidate `model`; returns the round record's "release" entry."""
        outputs = self._outputs(model, None if predictions is None else predictions.reference_labels)
        candidate = self._gate_metrics(outputs, signal)
        current = self.history.current_release
        current_metrics = None
        if current is not None:
            if self._released_outputs is None:
                self._released_outputs = self._outputs(self.released_model(build))
            current_metrics = self._gate_metrics(self._released_outputs, signal)  # agreement with today's signal
        promoted, reason = gate_decision(
            candidate, current_metrics, self.cfg.release, None if current is None else current.id
        )
        release = Release(
            id=release_id(rnd),
            round=rnd,
            parent=None if current is None else current.id,
            status=PROMOTED if promoted else REJECTED,
            reason=reason,
            reference_digest=self.reference_digest,
            config_digest=self.cfg.digest(),
            model=self.model_name,
            validation=asdict(candidate),
            test=dict(test_metrics),
            client_epsilon=client_epsilon,
            record_epsilon=record_epsilon,
        )
        if promoted:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            temperature = 1.0
            if self.cfg.release.calibrate and len(self.val_y):
                release.calibration = self._calibrate(
                    model, outputs[1], None if predictions is None else predictions.test_logits
                )
                temperature = release.calibration["temperature"]
            release.path = save_release_model(self.run_dir, release, state, temperature)
            self.released_state, self.released_temperature = state, temperature
            self._released_outputs = outputs
        self.history.add(release)
        save_index(self.run_dir, self.history)
        return {"candidate": release.id, "promoted": promoted, "reason": reason, "current": self.history.current}

    def _calibrate(self, model: Any, val_logits: Any, test_logits: Any = None) -> dict[str, Any]:
        from feddistill.calibration import calibrate, reliability_bins, softmax
        from feddistill.training import predict_logits

        if test_logits is None:
            test_logits = predict_logits(model, self.test_x).numpy()
        cal = calibrate(val_logits, self.val_y, extra={"test": (test_logits, self.test_y)})
        out = cal.to_dict()
        # reliability diagrams on the test split (reporting only; T was fitted on validation)
        out["reliability_test"] = {
            "before": reliability_bins(softmax(test_logits), self.test_y),
            "after": reliability_bins(softmax(test_logits, cal.temperature), self.test_y),
        }
        return out

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "releases": self.history.to_dict(),
            "released_state": self.released_state,
            "released_temperature": self.released_temperature,
        }


def _softmax(logits: Any) -> Any:
    from feddistill.calibration import softmax

    return softmax(logits)
