"""A run's folder: its layout, its records and its files. This module is their one owner.

**One run per folder.** A new run never writes into an earlier run's folder. Simulated
clients keep their students and privacy ledgers under the run's folder, the server its
checkpoint, journal and releases. A second run started in the same folder would pick those
up (a client's ledger from the first run, its student, old audit artefacts next to new
results). So a run refuses a folder that already holds a run unless it resumes that run
(``--resume``) or the user asks to replace it (``--overwrite``), which deletes what the
earlier run wrote, and only that. :func:`prepare_run_folder` is the one check: the CLI calls
it before the simulation starts (so a bad ``--out`` fails in one line before anything runs)
and the ServerApp at the start of every run (``flwr run .`` reads ``output-dir`` from the
run config).

**The layout** is the API between the pipeline and what reads a run back (audit, report,
export, releases, bench). Every path of it comes from :class:`RunFolder`; no other module of
``src/`` spells one (tests/test_runfolder_schema.py checks)::

    RUN_DIR/config.json                    the run's config (what `simulate --resume` reads back)
    RUN_DIR/privacy-plan.json             the run's privacy plan (feddistill.privacy.plan.RunPrivacy)
    RUN_DIR/results.json                   RunResults: rounds (RoundRecord), final (FinalBlock),
                                           baselines (Baselines), privacy (PrivacyReport), ...
    RUN_DIR/checkpoint.pt                  the server's checkpoint (feddistill.server.checkpoint)
    RUN_DIR/ledger-journal.jsonl           local-noise rounds journaled before they are sent
    RUN_DIR/global_student.pt              the deployed student: a model file (save_model)
    RUN_DIR/accuracy.png, reliability.png  plots
    RUN_DIR/releases/index.json            every release candidate (feddistill.server.gate)
    RUN_DIR/releases/<id>.pt               each promoted student: a model file
    RUN_DIR/clients/client<N>.pt           a simulated client's state (feddistill.client.state),
    RUN_DIR/clients/client<N>.prev.pt      and the version before it
    RUN_DIR/clients/workers.jsonl          which host, process and Ray node served each simulated
                                           client's round (feddistill.client.placement)
    RUN_DIR/audit/uploads/roundNNNN.npz    with audit.keep-artifacts: the uploads as received,
    RUN_DIR/audit/clients/client<N>.pt     each client's local student (a model file),
    RUN_DIR/audit/canaries.npz             and the one-run canaries
    RUN_DIR/released/roundNNNN.npz         every round's released teacher signal on its queries
                                           (queries, signal): what the client-level DP protects,
                                           read by `feddistill audit-deployment`
    RUN_DIR/secagg/roundNNNN.npz           under SecAgg+: what the server unmasked each round (the
                                           round's queries, the survivors' mean, their client ids)
    RUN_DIR/fedavg/, RUN_DIR/dp-fedavg/    the peer baselines' own run folders
    RUN_DIR/audit-report/                  `feddistill audit`: audit.json, report.md, ROC plots
    RUN_DIR/audit-deployment/              `feddistill audit-deployment`: audit.json, report.md, canaries.png
    RUN_DIR/exports/<id>/                  `feddistill export`: export.json and two TorchScript files
    RUN_DIR/report.html                    `feddistill report`

**results.json** is read and written through typed records (:class:`RunResults` and its
blocks): ``from_dict`` / ``to_dict`` keep every key, value and key order of the file, keys
the schema does not know included, so a file round-trips unchanged.

**Model files** (the global student, releases, local students, client states) are written
by :func:`save_model` and read by :func:`load_model`: one dict with the architecture name
(``model``), the ``state_dict``, a format ``version`` and the file's own metadata (e.g.
``temperature``, ``release``), written atomically and read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Self

from feddistill.atomic import atomic_path

__all__ = [
    "RUN_ENTRIES",
    "RUN_MARKERS",
    "RunFolder",
    "RunFolderError",
    "check_output_folder",
    "clear_run_folder",
    "prepare_run_folder",
    "run_markers",
    "client_state_paths",
    "ResultsFormatError",
    "UNSET",
    "RunResults",
    "RoundRecord",
    "FinalBlock",
    "Baselines",
    "PrivacyReport",
    "PrivacyClaim",
    "read_results",
    "MODEL_FILE_VERSION",
    "ModelFileError",
    "SavedModel",
    "save_model",
    "load_model",
    "model_of_blob",
]

# ---- the layout ---------------------------------------------------------------------------

CONFIG = "config.json"
PRIVACY_PLAN = "privacy-plan.json"
RESULTS = "results.json"
CHECKPOINT = "checkpoint.pt"
JOURNAL = "ledger-journal.jsonl"
GLOBAL_STUDENT = "global_student.pt"
ACCURACY_PLOT = "accuracy.png"
RELIABILITY_PLOT = "reliability.png"
RELEASES = "releases"
RELEASE_INDEX = "index.json"
CLIENTS = "clients"
WORKERS = "workers.jsonl"
SECAGG = "secagg"
AUDIT = "audit"
UPLOADS = "uploads"
CANARIES = "canaries.npz"
RELEASED = "released"  # every round's released teacher signal (server/outputs.save_released_signal)
BASELINE_DIRS = ("fedavg", "dp-fedavg")  # a peer baseline's run folder, named after its method
AUDIT_REPORT = "audit-report"
AUDIT_DEPLOYMENT = "audit-deployment"  # `feddistill audit-deployment`'s default report folder
CANARY_PLOT = "canaries.png"
AUDIT_JSON = "audit.json"
AUDIT_MARKDOWN = "report.md"
EXPORTS = "exports"
EXPORT_FP32 = "student_fp32.torchscript.pt"
EXPORT_INT8 = "student_int8.torchscript.pt"
EXPORT_META = "export.json"
REPORT_HTML = "report.html"

UPLOAD_FILE = re.compile(r"^round(\d+)\.npz$")  # audit/uploads/roundNNNN.npz, released/roundNNNN.npz
UPLOAD_KEY = re.compile(r"^client(-?\d+)$")  # an array of one sender's answers in an uploads file
CLIENT_FILE = re.compile(r"^client(\d+)\.pt$")  # audit/clients/client<N>.pt, clients/client<N>.pt

# Any of these in a folder means a run has started there (config.json is the first thing a
# run writes; clients/ holds simulated clients' students and ledgers).
RUN_MARKERS = (RESULTS, CHECKPOINT, CONFIG, CLIENTS)

# Everything a run writes in its folder, and what the commands that read a run back write
# there by default (audit, export, report): the only names --overwrite deletes.
RUN_ENTRIES = frozenset(
    {
        CONFIG,
        PRIVACY_PLAN,
        RESULTS,
        CHECKPOINT,
        JOURNAL,
        GLOBAL_STUDENT,
        ACCURACY_PLOT,
        RELIABILITY_PLOT,
        RELEASES,
        CLIENTS,
        AUDIT,
        RELEASED,  # the run itself
        SECAGG,  # the run itself
        *BASELINE_DIRS,  # its baselines (Flower's FedAvg / DP-FedAvg on the same fleet)
        AUDIT_REPORT,
        AUDIT_DEPLOYMENT,
        EXPORTS,
        REPORT_HTML,  # feddistill audit / export / report
    }
)


@dataclass(frozen=True)
class RunFolder:
    """Every path of one run's folder (see the module docstring for what each holds)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / CONFIG)
    privacy_plan = property(lambda self: self.root / PRIVACY_PLAN)
    results = property(lambda self: self.root / RESULTS)
    checkpoint = property(lambda self: self.root / CHECKPOINT)
    journal = property(lambda self: self.root / JOURNAL)
    global_student = property(lambda self: self.root / GLOBAL_STUDENT)
    accuracy_plot = property(lambda self: self.root / ACCURACY_PLOT)
    reliability_plot = property(lambda self: self.root / RELIABILITY_PLOT)
    releases = property(lambda self: self.root / RELEASES)
    release_index = property(lambda self: self.root / RELEASES / RELEASE_INDEX)
    clients = property(lambda self: self.root / CLIENTS)  # simulated clients' states
    workers = property(lambda self: self.root / CLIENTS / WORKERS)  # where each simulated client's round ran
    audit = property(lambda self: self.root / AUDIT)
    uploads = property(lambda self: self.root / AUDIT / UPLOADS)
    local_students = property(lambda self: self.root / AUDIT / CLIENTS)
    canaries = property(lambda self: self.root / AUDIT / CANARIES)
    released = property(lambda self: self.root / RELEASED)
    secagg = property(lambda self: self.root / SECAGG)
    audit_report = property(lambda self: self.root / AUDIT_REPORT)
    audit_deployment = property(lambda self: self.root / AUDIT_DEPLOYMENT)
    exports = property(lambda self: self.root / EXPORTS)
    report_html = property(lambda self: self.root / REPORT_HTML)

    def upload(self, rnd: int) -> Path:
        """The uploads of round ``rnd`` as the server received them."""
        return self.uploads / f"round{rnd:04d}.npz"

    def released_signal(self, rnd: int) -> Path:
        """Round ``rnd``'s released teacher signal: ``queries`` (|Q|,) and ``signal`` (|Q|, C)."""
        return self.released / f"round{rnd:04d}.npz"

    def released_rounds(self) -> dict[int, Path]:
        """Every released teacher signal in the folder, by round."""
        if not self.released.is_dir():
            return {}
        found = {p.name: UPLOAD_FILE.match(p.name) for p in self.released.iterdir()}
        return {int(m.group(1)): self.released / name for name, m in sorted(found.items()) if m}

    @staticmethod
    def audit_file(name: str) -> str:
        """A file name of an audit report folder: ``json`` (audit.json), ``markdown`` (report.md), ``canaries``."""
        return {"json": AUDIT_JSON, "markdown": AUDIT_MARKDOWN, "canaries": CANARY_PLOT}[name]

    @staticmethod
    def upload_key(client: int) -> str:
        """The array of ``client``'s answers in an uploads file (:data:`UPLOAD_KEY`)."""
        return f"client{client}"

    def secagg_sum(self, rnd: int) -> Path:
        """What the server unmasked in round ``rnd`` under SecAgg+ (no single answer: their mean)."""
        return self.secagg / f"round{rnd:04d}.npz"

    def local_student(self, client: int) -> Path:
        """Client ``client``'s final local student, kept for the audit."""
        return self.local_students / f"client{client}.pt"

    @staticmethod
    def release_file(rid: str) -> str:
        """Where release ``rid``'s student lies, relative to the run folder (as the release index records it)."""
        return f"{RELEASES}/{rid}.pt"

    def release_model(self, rid: str) -> Path:
        return self.root / self.release_file(rid)

    def baseline(self, method: str) -> Path:
        """The run folder of a peer baseline (``fedavg`` or ``dp-fedavg``)."""
        if method not in BASELINE_DIRS:
            raise ValueError(f"no baseline run folder for method {method!r} (known: {', '.join(BASELINE_DIRS)})")
        return self.root / method

    def export(self, rid: str) -> Path:
        """``feddistill export``'s default folder for release ``rid``."""
        return self.exports / rid

    def export_metadata(self) -> list[Path]:
        """Every export's ``export.json`` in this run folder, sorted."""
        return sorted(self.exports.glob(f"*/{EXPORT_META}"))

    @staticmethod
    def audit_roc(target: str) -> str:
        """The name of an audit target's log-log ROC plot in the audit report's folder."""
        return f"roc_{target}.png"

    @staticmethod
    def audit_deployment_link(name: str = AUDIT_MARKDOWN) -> str:
        """A file of the default deployment-audit report, relative to the run folder."""
        return f"{AUDIT_DEPLOYMENT}/{name}"

    @staticmethod
    def audit_report_link(name: str = AUDIT_MARKDOWN) -> str:
        """A file of the default audit report, relative to the run folder (a link from report.html)."""
        return f"{AUDIT_REPORT}/{name}"


def client_state_paths(directory: str | os.PathLike[str], client: int) -> tuple[Path, Path]:
    """A client's state file and the version before it, in its state folder (a simulated
    client's is :attr:`RunFolder.clients`, a device's its own data dir's ``state``)."""
    current = Path(directory) / f"client{client}.pt"
    return current, current.with_suffix(".prev.pt")


# ---- one run per folder -----------------------------------------------------------------

# atomic_path's temp files (".<stem>.<12 hex>.tmp<suffix>") and this module's write probes,
# left behind by a killed run
_TEMP_FILE = re.compile(r"^(\..+\.[0-9a-f]{12}\.tmp(\.[\w-]+)?|\.feddistill-probe-\w+)$")

CLI_WAYS_OUT = "continue it with `feddistill simulate --resume {path}`, or replace it with --overwrite"


class RunFolderError(ValueError):
    """A run folder cannot be used as asked; the message is one line naming the folder."""


def run_markers(path: str | os.PathLike[str]) -> list[str]:
    """The :data:`RUN_MARKERS` present in ``path`` (empty when it holds no run)."""
    path = Path(path)
    return [name for name in RUN_MARKERS if os.path.lexists(path / name)] if path.is_dir() else []


def prepare_run_folder(
    path: str | os.PathLike[str], *, resume: bool = False, overwrite: bool = False, ways_out: str = CLI_WAYS_OUT
) -> Path:
    """Make ``path`` ready for a run and return it, or raise :class:`RunFolderError`.

    - a new run (neither flag): the folder must not hold a run (:data:`RUN_MARKERS`);
    - ``overwrite``: an earlier run's files are deleted first (:func:`clear_run_folder`);
    - ``resume``: the folder must exist (the caller checks it holds a resumable run).

    In every case the folder must be a writable directory (created when missing).
    ``ways_out`` tells the user how to go on when the folder holds a run (``{path}`` is filled in).
    """
    path = Path(path)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: resume a run, or replace it")
    _check_place(path)
    if resume:
        if not path.is_dir():
            raise RunFolderError(f"{path}: no such run folder to resume")
    else:
        found = run_markers(path)
        if found and not overwrite:
            raise RunFolderError(f"{path}: holds an earlier run ({', '.join(found)}); " + ways_out.format(path=path))
        if found:
            clear_run_folder(path)
    return check_output_folder(path)


def check_output_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` as a writable directory (created when missing), or :class:`RunFolderError`
    saying why not: it is a file, lies under a file, or cannot be written."""
    path = Path(path)
    _check_place(path)
    _check_writable(path)
    return path


def clear_run_folder(path: str | os.PathLike[str]) -> list[str]:
    """Delete what a run wrote in ``path`` (the names in :data:`RUN_ENTRIES` and leftover temp
    files); returns the names deleted. Refuses, deleting nothing, a folder that does not look
    like a feddistill run or that holds anything else (the user's own files stay theirs)."""
    path = Path(path)
    if not run_markers(path):
        raise RunFolderError(f"{path}: not cleared: it holds no feddistill run ({', '.join(RUN_MARKERS)})")
    for name in (CONFIG, RESULTS):
        if (path / name).is_file() and not _is_run_json(path / name):
            raise RunFolderError(f"{path}: not cleared: {name} was not written by a feddistill run")
    entries = sorted(path.iterdir())
    strangers = [e.name for e in entries if e.name not in RUN_ENTRIES and not _TEMP_FILE.match(e.name)]
    if strangers:
        shown = ", ".join(strangers[:3]) + (", ..." if len(strangers) > 3 else "")
        raise RunFolderError(
            f"{path}: not cleared: it also holds {shown}, which no feddistill run writes; "
            "move those away or choose another folder"
        )
    for entry in entries:
        try:
            if entry.is_dir() and not entry.is_symlink():  # a link is removed, never followed
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as exc:
            raise RunFolderError(f"{entry}: cannot delete it ({exc.strerror or exc})") from None
    return [e.name for e in entries]


def _is_run_json(path: Path) -> bool:
    """config.json and results.json of a run are JSON objects naming the run's method."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "method" in data


def _check_place(path: Path) -> None:
    """The folder is, or can become, a directory: neither it nor a parent is a file."""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{path}: is a file, not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunFolderError(f"{path}: cannot be a folder: {parent} is a file")
            return


def _check_writable(path: Path) -> None:
    """Create the folder and a probe file in it: the only test that also holds for root,
    read-only mounts and ACLs."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".feddistill-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunFolderError(f"{path}: cannot write there ({exc.strerror or type(exc).__name__})") from None


# ---- results.json: typed records ----------------------------------------------------------


class ResultsFormatError(ValueError):
    """results.json, or a block of it, does not have the schema's shape; the message names the key."""


class _Unset:
    """The default of an optional key: absent from the file (reads as None, is not written back)."""

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()
_BASE_FIELDS = frozenset({"extra", "_absent", "_order"})


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _plain(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass(kw_only=True)
class _Record:
    """One block of results.json.

    Keys the block always has are fields without a default; the others default to
    :data:`UNSET`: a key absent from the file reads as ``None`` and is not written back.
    Keys the schema does not know are kept in :attr:`extra` and written back after the known
    ones; a block read from a file is written back in the file's key order. A record reads
    like the dict it was (``rec["key"]``, ``rec.get("key")``, ``"key" in rec``) and by attribute.
    """

    OMIT_IF_NONE: ClassVar[frozenset[str]] = frozenset()  # written only when not None

    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    _absent: frozenset[str] = field(default=frozenset(), init=False, repr=False)
    _order: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    @classmethod
    def _nested(cls) -> dict[str, Callable[[Any, str], Any]]:
        """Keys holding a record (or a list of records): the parser of each."""
        return {}

    @classmethod
    def keys_(cls) -> list[str]:
        """The block's keys the schema knows, in the order the writer writes them."""
        return [f.name for f in fields(cls) if f.name not in _BASE_FIELDS]

    @classmethod
    def required(cls) -> list[str]:
        return [
            f.name
            for f in fields(cls)
            if f.name not in _BASE_FIELDS and f.default is MISSING and f.default_factory is MISSING
        ]

    def __post_init__(self) -> None:
        absent = frozenset(name for name in self.keys_() if getattr(self, name) is UNSET)
        for name in absent:
            object.__setattr__(self, name, None)
        object.__setattr__(self, "_absent", absent)
        for name, parse in self._nested().items():
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, parse(value, name))

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        absent = self.__dict__.get("_absent")
        if absent and name in absent and value is not UNSET:  # a key set after reading is written
            object.__setattr__(self, "_absent", absent - {name})

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> Self:
        """The record of ``d``; :class:`ResultsFormatError` names a missing key or a block that is not an object."""
        if not isinstance(d, dict):
            raise ResultsFormatError(f"'{where or cls.__name__}' must be an object, got {type(d).__name__}")
        names = cls.keys_()
        missing = [name for name in cls.required() if name not in d]
        if missing:
            raise ResultsFormatError(f"missing key '{_join(where, missing[0])}'")
        nested = cls._nested()
        values = {
            name: (nested[name](d[name], _join(where, name)) if name in nested and d[name] is not None else d[name])
            for name in names
            if name in d
        }
        record = cls(**values, extra={k: v for k, v in d.items() if k not in names})
        object.__setattr__(record, "_order", tuple(d))
        return record

    def to_dict(self) -> dict[str, Any]:
        """The block as results.json holds it."""
        out: dict[str, Any] = {}
        for name in self.keys_():
            value = getattr(self, name)
            if name in self._absent or (value is None and name in self.OMIT_IF_NONE):
                continue
            out[name] = _plain(value)
        out.update(self.extra)
        if self._order:
            out = {**{k: out[k] for k in self._order if k in out}, **out}
        return out

    def __contains__(self, key: object) -> bool:
        if key in self.extra:
            return True
        if not isinstance(key, str) or key not in self.keys_() or key in self._absent:
            return False
        return not (getattr(self, key) is None and key in self.OMIT_IF_NONE)

    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return self.extra[key] if key in self.extra else getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default


def _record(cls: type[_Record]) -> Callable[[Any, str], Any]:
    """Parser of a key holding one ``cls`` record (or null)."""

    def parse(value: Any, where: str) -> Any:
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ResultsFormatError(f"'{where}' must be an object or null, got {type(value).__name__}")
        return cls.from_dict(value, where)

    return parse


def _records(cls: type[_Record]) -> Callable[[Any, str], Any]:
    """Parser of a key holding a list of ``cls`` records."""

    def parse(value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise ResultsFormatError(f"'{where}' must be a list, got {type(value).__name__}")
        return [v if isinstance(v, cls) else cls.from_dict(v, f"{where}[{i}]") for i, v in enumerate(value)]

    return parse


@dataclass(kw_only=True)
class RoundRecord(_Record):
    """One round of ``rounds`` (``feddistill.server.loop``); a peer run (FedAvg) writes the
    round and its student's test metrics only."""

    OMIT_IF_NONE = frozenset({"population"})

    round: int
    clients: int = UNSET  # clients sent the round's download
    replies: int = UNSET  # validated replies
    dropped: dict[str, int] = UNSET  # dropped replies and dropouts, by reason
    dropped_clients: list[int] = UNSET  # client ids sent the download whose answer was not kept
    over_budget_skipped: int = UNSET
    answered_queries: int = UNSET
    fleet_labelled_rows: int = UNSET  # reference rows whose training label is the fleet's
    consensus_threshold: float | None = UNSET
    teacher_accuracy: float | None = UNSET  # of the round's aggregated answers, on the answered rows
    student_accuracy: float
    student_nll: float = UNSET
    student_ece: float = UNSET
    agreement: float = UNSET
    per_class_accuracy: list[float | None] = UNSET
    drift_kl: float | None = UNSET
    drift_alert: str | None = UNSET
    release: dict[str, Any] = UNSET  # the gate's decision on the round's candidate
    released_accuracy: float = UNSET
    bytes_uploaded: int = UNSET
    client_epsilon: float | None = UNSET
    seconds: float = UNSET
    population: str | None = UNSET  # the label-shift scenario's population ("A" or "B"), only with it


@dataclass(kw_only=True)
class FinalBlock(_Record):
    """``final``: the last round's student, the release, the bytes, the private data's gain;
    a peer run writes its student's accuracy and its bytes per client-round only."""

    student_accuracy: float | None
    student_nll: float = UNSET
    student_ece: float = UNSET
    agreement: float = UNSET
    released_id: str | None = UNSET
    released_accuracy: float = UNSET
    bytes_uploaded_total: int = UNSET
    bytes_per_client_round: float
    fleet_labelled_rows: int = UNSET
    public_control_accuracy: float = UNSET
    private_gain: float = UNSET  # points over the public-only control
    gap_closed: float | None = UNSET  # share of the centralized baseline's lead closed (needs it)


@dataclass(kw_only=True)
class Baselines(_Record):
    """``baselines``: the server's public-only control, and what `feddistill simulate` adds."""

    public_control: dict[str, Any] = UNSET  # accuracy, per_round
    public_teacher: dict[str, Any] = UNSET
    public_only_student: dict[str, Any] = UNSET
    local_only: dict[str, Any] = UNSET  # accuracy_mean, clients_evaluated, ...
    centralized: dict[str, Any] = UNSET
    fedavg: dict[str, Any] = UNSET  # init, accuracy, bytes_per_client_round, rounds
    dp_fedavg: dict[str, Any] = UNSET  # accuracy, bytes_per_client_round, privacy, rounds


@dataclass(kw_only=True)
class PrivacyClaim(_Record):
    """One ε claim of ``privacy`` (``client_level`` or ``record_level``): ε at δ for a unit,
    with its mechanism and accountant; the rest (history, noise, sampling, ...) in :attr:`extra`."""

    epsilon: float | None = UNSET  # None: nothing was accounted (no device trained)
    delta: float = UNSET
    unit: str = UNSET
    neighbouring: str = UNSET
    mechanism: str = UNSET
    accountant: str = UNSET


@dataclass(kw_only=True)
class PrivacyReport(_Record):
    """``privacy``: each unit's claim, null for a unit the run claims nothing for."""

    client_level: PrivacyClaim | None = UNSET
    record_level: PrivacyClaim | None = UNSET
    secure_aggregation: dict[str, Any] = UNSET  # only with distill.secure-aggregation

    @classmethod
    def _nested(cls) -> dict[str, Callable[[Any, str], Any]]:
        return {"client_level": _record(PrivacyClaim), "record_level": _record(PrivacyClaim)}

    def claims(self) -> dict[str, PrivacyClaim | None]:
        return {"record_level": self.record_level, "client_level": self.client_level}


@dataclass(kw_only=True)
class RunResults(_Record):
    """results.json of a run: a feddistill run (``feddistill.server.loop``) or a peer
    baseline's (``feddistill.server.fedavg``, which writes ``init`` and fewer blocks)."""

    method: str
    config: dict[str, Any]
    config_digest: str = UNSET
    reference_digest: str = UNSET
    num_nodes: int = UNSET
    public_teacher: dict[str, Any] = UNSET
    public_only_student: dict[str, Any] = UNSET
    student: dict[str, Any] = UNSET
    rounds: list[RoundRecord]
    final: FinalBlock = UNSET
    baselines: Baselines = UNSET
    stop_reason: str | None = UNSET
    validation: dict[str, Any] = UNSET
    releases: dict[str, Any] = UNSET
    calibration: dict[str, Any] | None = UNSET
    drift: dict[str, Any] = UNSET
    privacy: PrivacyReport = UNSET
    label_histograms: list[list[int]] | None = UNSET
    init: str = UNSET  # a FedAvg peer: "public" or "scratch"

    @classmethod
    def _nested(cls) -> dict[str, Callable[[Any, str], Any]]:
        return {
            "rounds": _records(RoundRecord),
            "final": _record(FinalBlock),
            "baselines": _record(Baselines),
            "privacy": _record(PrivacyReport),
        }

    @classmethod
    def coerce(cls, results: RunResults | Mapping[str, Any]) -> RunResults:
        """``results`` as a record (a results.json dict is parsed)."""
        return results if isinstance(results, RunResults) else cls.from_dict(dict(results))


def read_results(path: str | os.PathLike[str]) -> RunResults:
    """A results.json file as :class:`RunResults`; :class:`ResultsFormatError` names the file
    and what is wrong (missing, not JSON, not the schema's shape)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsFormatError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsFormatError(f"{path}: corrupt ({exc})") from exc
    try:
        return RunResults.from_dict(data, "")
    except ResultsFormatError as exc:
        raise ResultsFormatError(f"{path}: {exc}") from exc


# ---- model files --------------------------------------------------------------------------

MODEL_FILE_VERSION = 1
_MODEL_KEYS = ("version", "model", "state_dict")


class ModelFileError(RunFolderError):
    """A model file is missing, unreadable, not a model file or of a version this feddistill
    does not read (``unknown_version``); the message names the file."""

    def __init__(self, message: str, *, unknown_version: bool = False) -> None:
        super().__init__(message)
        self.unknown_version = unknown_version


@dataclass
class SavedModel:
    """What a model file holds: the architecture (``feddistill.models`` name; None where the
    file does not record it), the weights, and the file's own metadata."""

    model: str | None
    state_dict: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)


def save_model(
    path: str | os.PathLike[str],
    model: str | None,
    state_dict: Mapping[str, Any],
    *,
    previous: str | os.PathLike[str] | None = None,
    **metadata: Any,
) -> Path:
    """Write a model file atomically: ``{"model", "state_dict", **metadata, "version"}``.

    ``metadata`` is plain data (numbers, strings, lists, dicts, tensors): what
    ``torch.load(weights_only=True)`` reads back. ``previous``: the file's current version is
    kept there (:func:`feddistill.atomic.atomic_path`).
    """
    import torch

    clash = sorted(set(metadata) & set(_MODEL_KEYS))
    if clash:
        raise ValueError(f"model-file metadata cannot use the reserved key(s) {clash}")
    blob = {"model": model, "state_dict": state_dict, **metadata, "version": MODEL_FILE_VERSION}
    path = Path(path)
    with atomic_path(path, previous=previous) as tmp:
        torch.save(blob, tmp)
    return path


def load_model(
    path: str | os.PathLike[str],
    *,
    what: str = "model file",
    legacy: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> SavedModel:
    """Read a model file written by :func:`save_model` (or before it had a ``version``: the
    same shape). ``legacy`` maps an older shape without ``version`` to this one.
    :class:`ModelFileError` names the file: missing, unreadable, not a model file, or of a
    newer version (``unknown_version``)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: missing ({what})")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt pickle/zip
        raise ModelFileError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc})") from exc
    if legacy is not None and isinstance(blob, dict) and "version" not in blob:
        blob = legacy(blob)
    return model_of_blob(blob, what, path)


def model_of_blob(blob: Any, what: str = "model file", path: str | os.PathLike[str] | None = None) -> SavedModel:
    """A model file's content (already loaded) as :class:`SavedModel`; :class:`ModelFileError`
    when it is not a model file or of a version this feddistill does not read."""
    where = f"{path}: " if path is not None else ""
    if not isinstance(blob, dict) or "model" not in blob or "state_dict" not in blob:
        raise ModelFileError(f"{where}{what} must be a dict with keys 'model' and 'state_dict'")
    version = blob.get("version", MODEL_FILE_VERSION)  # files from before `version`: the same shape
    if version != MODEL_FILE_VERSION:
        raise ModelFileError(
            f"{where}{what} is a version-{version!r} model file; this feddistill reads version "
            f"{MODEL_FILE_VERSION}: read it with the feddistill that wrote it",
            unknown_version=True,
        )
    return SavedModel(blob["model"], blob["state_dict"], {k: v for k, v in blob.items() if k not in _MODEL_KEYS})
