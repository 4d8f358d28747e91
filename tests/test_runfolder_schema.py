"""The run folder's schema (issue 17, item 4): one owner, ``feddistill.runfolder``.

- results.json's typed records (rounds, final, baselines, privacy) round-trip every key,
  value and key order, and parse the results.json files real runs wrote (bench/results);
- the writer's blocks are the records: the round loop's ``results`` dict has the keys of
  :class:`RunResults`, in its order;
- no module of ``src/`` spells a run-folder path but the schema module;
- model files: one save/load pair, versioned; client states (with the device's ledger in the
  ledger's own versioned format) read back, old files included, and a newer version is refused
  with a clear error.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from feddistill.runfolder import (
    MODEL_FILE_VERSION,
    Baselines,
    FinalBlock,
    ModelFileError,
    PrivacyClaim,
    PrivacyReport,
    ResultsFormatError,
    RoundRecord,
    RunFolder,
    RunResults,
    load_model,
    read_results,
    save_model,
)

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "feddistill"
SCHEMA = SRC / "runfolder.py"
REAL_RESULTS = sorted((ROOT / "bench" / "results").rglob("results.json"))


# ---- typed records: round trips ----------------------------------------------------------------


def _round(rnd: int) -> dict:
    """A round record as the round loop writes it (every key, in its order)."""
    return {
        "round": rnd,
        "clients": 5,
        "replies": 4,
        "dropped": {"dropped out": 1},
        "over_budget_skipped": 0,
        "answered_queries": 200,
        "fleet_labelled_rows": 120,
        "consensus_threshold": 0.9,
        "teacher_accuracy": None,
        "student_accuracy": 0.71,
        "student_nll": 0.9,
        "student_ece": 0.1,
        "agreement": 0.93,
        "per_class_accuracy": [0.5, None, 0.7],
        "drift_kl": None,
        "drift_alert": None,
        "release": {"candidate": f"r{rnd:04d}", "promoted": True, "reason": "no regression", "current": "r0001"},
        "released_accuracy": 0.72,
        "bytes_uploaded": 4000,
        "client_epsilon": None,
        "seconds": 1.5,
    }


def _results() -> dict:
    claim = {
        "epsilon": 1.5,
        "delta": 1e-5,
        "unit": "client",
        "neighbouring": "add/remove",
        "mechanism": "Gaussian",
        "accountant": "pld",
        "target_epsilon": 4.0,
        "history": [{"round": 1, "cumulative_epsilon": 1.5}],
    }
    return {
        "method": "feddistill",
        "config": {"rounds": 2},
        "config_digest": "c" * 64,
        "reference_digest": "d" * 64,
        "num_nodes": 5,
        "public_teacher": {"model": "cnn", "test_accuracy": 0.75},
        "public_only_student": {"test_accuracy": 0.7},
        "student": {"model": "mlp", "parameters": 1000},
        "rounds": [_round(1), {**_round(2), "population": "B"}],
        "final": {
            "student_accuracy": 0.73,
            "student_nll": 0.9,
            "student_ece": 0.1,
            "agreement": 0.9,
            "released_id": "r0002",
            "released_accuracy": 0.72,
            "bytes_uploaded_total": 8000,
            "bytes_per_client_round": 1000.0,
            "fleet_labelled_rows": 120,
            "public_control_accuracy": 0.7,
            "private_gain": 3.0,
            "gap_closed": None,
        },
        "baselines": {
            "public_control": {"accuracy": 0.7, "per_round": [0.6, 0.7]},
            "public_teacher": {"test_accuracy": 0.75},
            "centralized": {"accuracy": 0.95},
        },
        "stop_reason": None,
        "validation": {"split": "held-out", "size": 20},
        "releases": {"current": "r0002", "releases": []},
        "calibration": None,
        "drift": {"kl_threshold": 0.1, "alerts": []},
        "privacy": {"client_level": claim, "record_level": None},
        "label_histograms": [[1, 2], [3, 4]],
        "a_key_from_the_future": {"kept": True},
    }


def _same(a: dict, b: dict) -> bool:
    """Equal, key order included (what json.dumps writes)."""
    return json.dumps(a) == json.dumps(b)


def test_records_round_trip_every_key_value_and_order():
    data = _results()
    results = RunResults.from_dict(data)
    assert _same(results.to_dict(), data)
    # typed blocks
    assert isinstance(results.rounds[0], RoundRecord) and isinstance(results.final, FinalBlock)
    assert isinstance(results.baselines, Baselines) and isinstance(results.privacy, PrivacyReport)
    assert isinstance(results.privacy.client_level, PrivacyClaim) and results.privacy.record_level is None
    assert results.rounds[1].population == "B" and "population" not in results.rounds[0]
    assert results.privacy.client_level.epsilon == 1.5 and results.privacy.client_level["history"][0]["round"] == 1
    assert results.final.gap_closed is None and "gap_closed" in results.final  # null, and written back
    assert results.baselines.local_only is None and "local_only" not in results.baselines  # absent, not written
    assert results["a_key_from_the_future"] == {"kept": True}
    # every block on its own
    for cls, block in (
        (RoundRecord, data["rounds"][1]),
        (FinalBlock, data["final"]),
        (Baselines, data["baselines"]),
        (PrivacyReport, data["privacy"]),
    ):
        assert _same(cls.from_dict(block).to_dict(), block)
        assert cls.from_dict(block) == cls.from_dict(json.loads(json.dumps(block)))


def test_records_built_by_a_writer_write_only_what_it_gives():
    assert RoundRecord(round=1, student_accuracy=0.5, student_nll=0.6, student_ece=0.1).to_dict() == {
        "round": 1,
        "student_accuracy": 0.5,
        "student_nll": 0.6,
        "student_ece": 0.1,
    }  # a FedAvg round
    assert "population" not in RoundRecord(round=1, student_accuracy=0.5, population=None).to_dict()
    assert FinalBlock(student_accuracy=None, bytes_per_client_round=10).to_dict() == {
        "student_accuracy": None,
        "bytes_per_client_round": 10,
    }
    report = PrivacyReport(client_level=None, record_level={"epsilon": 2.0, "delta": 1e-5})
    assert report.to_dict() == {"client_level": None, "record_level": {"epsilon": 2.0, "delta": 1e-5}}
    report.secure_aggregation = {"on": True}  # set after construction: written
    assert report.to_dict()["secure_aggregation"] == {"on": True}
    assert isinstance(report.record_level, PrivacyClaim)
    base = Baselines.from_dict({"public_control": {"accuracy": 0.5}})
    base.centralized = {"accuracy": 0.9}
    base.public_teacher = {"test_accuracy": 0.8}
    assert list(base.to_dict()) == ["public_control", "public_teacher", "centralized"]  # the writer's order


def test_records_name_what_is_missing_or_malformed():
    with pytest.raises(ResultsFormatError, match=r"missing key 'rounds\[0\]\.student_accuracy'"):
        RunResults.from_dict({"method": "feddistill", "config": {}, "rounds": [{"round": 1}]})
    with pytest.raises(ResultsFormatError, match="'privacy.record_level' must be an object or null"):
        PrivacyReport.from_dict({"record_level": "small"}, "privacy")
    with pytest.raises(ResultsFormatError, match="'rounds' must be a list"):
        RunResults.from_dict({"method": "feddistill", "config": {}, "rounds": {}})
    with pytest.raises(ResultsFormatError, match="missing key 'final.bytes_per_client_round'"):
        RunResults.from_dict({"method": "fedavg", "config": {}, "rounds": [], "final": {"student_accuracy": 1}})


# ---- results.json written by real runs ---------------------------------------------------------


def test_real_runs_results_parse_into_the_records():
    """Every results.json the benchmark suites kept (feddistill and its FedAvg / DP-FedAvg peers,
    from several versions of the writer) parses, and is written back byte for byte."""
    assert len(REAL_RESULTS) >= 10, "bench/results holds the results of real runs"
    methods = set()
    for path in REAL_RESULTS:
        data = json.loads(path.read_text())
        results = read_results(path)
        methods.add(results.method)
        assert _same(results.to_dict(), data), path
        assert all(isinstance(r, RoundRecord) and isinstance(r.student_accuracy, float) for r in results.rounds)
        assert isinstance(results.final, FinalBlock) and isinstance(results.privacy, PrivacyReport)
        # built field by field, as the writers build them: the files' key order
        assert all(_same(RoundRecord(**r).to_dict(), r) for r in data["rounds"]), path
        assert _same(FinalBlock(**data["final"]).to_dict(), data["final"]), path
        if results.method == "feddistill":
            assert all(isinstance(r.replies, int) and isinstance(r.dropped, dict) for r in results.rounds), path
            assert isinstance(results.baselines, Baselines) and "public_teacher" in results.baselines
        for claim in results.privacy.claims().values():
            assert claim is None or claim.epsilon is None or claim.delta < 1
    assert {"feddistill", "fedavg", "dp-fedavg"} <= methods


def test_read_results_names_the_file(tmp_path):
    with pytest.raises(ResultsFormatError, match="results.json: not found"):
        read_results(tmp_path / "results.json")
    (tmp_path / "results.json").write_text("{broken")
    with pytest.raises(ResultsFormatError, match="results.json: corrupt"):
        read_results(tmp_path / "results.json")
    (tmp_path / "results.json").write_text(json.dumps({"method": "feddistill", "config": {}}))
    with pytest.raises(ResultsFormatError, match="results.json: missing key 'rounds'"):
        read_results(tmp_path / "results.json")


def _dict_keys_returned(function: ast.FunctionDef) -> list[str]:
    returned = next(n.value for n in ast.walk(function) if isinstance(n, ast.Return) and isinstance(n.value, ast.Dict))
    return [k.value for k in returned.keys]


def test_the_round_loop_writes_the_records_keys():
    """server/loop.py assembles results.json as a dict: its keys are RunResults', in order; its
    round record and final block are built as RoundRecord and FinalBlock."""
    tree = ast.parse((SRC / "server" / "loop.py").read_text(encoding="utf-8"))
    run = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DistillationRun")
    methods = {n.name: n for n in run.body if isinstance(n, ast.FunctionDef)}
    keys = _dict_keys_returned(methods["results"])
    assert keys == [k for k in RunResults.keys_() if k != "init"]  # `init`: a FedAvg peer's
    built = {
        n.func.id
        for name in ("round_record", "final")
        for n in ast.walk(methods[name])
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    assert {"RoundRecord", "FinalBlock"} <= built


# ---- no run-folder path outside the schema -----------------------------------------------------

# file names and path templates ("{}" for an f-string's replacement field) of a run folder
FILES = {
    "results.json",
    "config.json",
    "checkpoint.pt",
    "ledger-journal.jsonl",
    "global_student.pt",
    "accuracy.png",
    "reliability.png",
    "index.json",
    "canaries.npz",
    "report.html",
    "audit.json",
    "report.md",
    "export.json",
    "student_fp32.torchscript.pt",
    "student_int8.torchscript.pt",
    ".prev.pt",
    "round{}.npz",
    "client{}.pt",
    "roc_{}.png",
}
# folder names: also words of results.json or method names, so a path only where one is built
DIRS = {"releases", "clients", "audit", "uploads", "audit-report", "exports", "fedavg", "dp-fedavg"}

# Modules whose owners are migrating them onto feddistill.runfolder in their own change (the
# names they spell are RunFolder's: RESULTS, ACCURACY_PLOT, EXPORTS, RELEASES, RELEASE_INDEX,
# AUDIT_REPORT, AUDIT_JSON, AUDIT_MARKDOWN). Nothing else may be added here.
NOT_YET_MIGRATED: dict[str, set[str]] = {}  # every module migrated; a new exception needs a reason here


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _template(node: ast.JoinedStr) -> str:
    return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)


def _is_path(text: str, in_path_expr: bool) -> bool:
    """A run-folder file name, a path made of run-folder names, or (where a path is built) a folder name."""
    if text in FILES or (in_path_expr and text in DIRS):
        return True
    parts = text.split("/")
    known = [p for p in parts if p in FILES or p in DIRS]
    return len(parts) > 1 and bool(known) and all(p in FILES or p in DIRS or p in ("", "*", "{}") for p in parts)


def run_folder_literals(source: str) -> list[tuple[int, str]]:
    """(line, literal) of every run-folder path spelled in ``source`` (docstrings left out)."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    in_path: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            in_path.update({id(node.left), id(node.right)})
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
            "Path",
            "joinpath",
            "join",
            "glob",
            "with_name",
        ):
            in_path.update(id(a) for a in node.args)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = _template(node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
        else:
            continue
        if _is_path(text, id(node) in in_path):
            found.append((node.lineno, node.col_offset, text))
    return [(line, text) for line, _, text in sorted(found)]


def test_the_scanner_finds_paths_and_leaves_words_alone():
    code = (
        '"""results.json: docs are prose."""\n'
        'a = run / "results.json"\nb = out / "audit" / "uploads" / f"round{r:04d}.npz"\n'
        'c = {"clients": 3, "releases": []}\nd = f"{x}: see results.json for more"\n'
        'e = "exports/*/export.json"\nf = Path(run_dir, "fedavg")\ng = "audit"\n'
    )
    assert run_folder_literals(code) == [
        (2, "results.json"),
        (3, "audit"),
        (3, "uploads"),
        (3, "round{}.npz"),
        (6, "exports/*/export.json"),
        (7, "fedavg"),
    ]


def test_no_run_folder_path_outside_the_schema_module():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path == SCHEMA:
            continue
        allowed = NOT_YET_MIGRATED.get(str(path.relative_to(SRC)), set())
        for line, text in run_folder_literals(path.read_text(encoding="utf-8")):
            if text not in allowed:
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not offenders, (
        "run-folder paths belong to feddistill.runfolder (RunFolder and its names); "
        "spelled elsewhere:\n" + "\n".join(offenders)
    )


# ---- model files and client states -------------------------------------------------------------


def _weights() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}


def test_model_files_round_trip_with_their_metadata(tmp_path):
    path = save_model(tmp_path / "global_student.pt", "mlp", _weights(), temperature=1.5, release="r0003")
    saved = load_model(path)
    assert saved.model == "mlp" and saved.metadata == {"temperature": 1.5, "release": "r0003"}
    assert all(torch.equal(saved.state_dict[k], v) for k, v in _weights().items())
    blob = torch.load(path, weights_only=True)  # what other readers of the file see
    assert blob["model"] == "mlp" and blob["version"] == MODEL_FILE_VERSION and blob["temperature"] == 1.5
    assert [p.name for p in tmp_path.iterdir()] == ["global_student.pt"]  # written atomically: no temp file left
    with pytest.raises(ValueError, match="reserved"):
        save_model(tmp_path / "x.pt", "mlp", _weights(), version=2)


def test_model_files_from_before_the_version_and_bad_ones(tmp_path):
    torch.save({"model": "cnn", "state_dict": _weights()}, tmp_path / "old.pt")  # the shape every writer had
    assert load_model(tmp_path / "old.pt").model == "cnn"
    torch.save({"model": "cnn", "state_dict": _weights(), "version": MODEL_FILE_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(ModelFileError, match="new.pt: .*version-2 model file") as err:
        load_model(tmp_path / "new.pt")
    assert err.value.unknown_version
    (tmp_path / "bad.pt").write_bytes(b"\0" * 10)
    with pytest.raises(ModelFileError, match="bad.pt: cannot read"):
        load_model(tmp_path / "bad.pt")
    torch.save({"state_dict": _weights()}, tmp_path / "half.pt")
    with pytest.raises(ModelFileError, match="keys 'model' and 'state_dict'"):
        load_model(tmp_path / "half.pt")
    with pytest.raises(ModelFileError, match="missing"):
        load_model(tmp_path / "none.pt")


def test_client_state_keeps_the_ledger_in_its_versioned_format(tmp_path):
    from feddistill.client.state import load_state, save_state
    from feddistill.privacy.accounting import GaussianEvent
    from feddistill.privacy.ledger import PrivacyLedger
    from feddistill.runfolder import client_state_paths

    ledger = PrivacyLedger(unit="record", delta=1e-5, target_epsilon=None, mechanism="dp-sgd")
    ledger.record(GaussianEvent(1.0, 0.1, 10), 1)
    save_state(tmp_path, 3, 1, _weights(), ledger.to_json())
    save_state(tmp_path, 3, 2, {"w": torch.ones(1)}, ledger.to_json())
    current, previous = client_state_paths(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([current.name, previous.name])
    saved = load_model(current)
    assert saved.metadata["round"] == 2 and saved.metadata["seq"] == 1
    stored = json.loads(saved.metadata["ledger"])  # the ledger's own format, with its version
    assert stored["format"] == "feddistill.privacy_ledger" and stored["version"] == 1
    kept = load_state(tmp_path, 3, 2)  # round 2 re-run: the student from before it, the newest ledger
    assert torch.equal(kept.student["w"], _weights()["w"])
    assert PrivacyLedger.from_json(kept.ledger_json).epsilon() == pytest.approx(ledger.epsilon())
    with pytest.raises(ValueError, match="unsupported ledger version 9 .*do not delete it"):
        PrivacyLedger.from_json(json.dumps({**stored, "version": 9}))


def test_client_state_files_from_before_model_files_still_load(tmp_path):
    from feddistill.client.state import load_state, save_state
    from feddistill.runfolder import client_state_paths

    current, _ = client_state_paths(tmp_path, 0)
    torch.save({"round": 4, "seq": 7, "student": _weights(), "ledger": "old-ledger"}, current)  # the old shape
    kept = load_state(tmp_path, 0, 5)
    assert kept.ledger_json == "old-ledger" and torch.equal(kept.student["b"], torch.zeros(2))
    save_state(tmp_path, 0, 5, {"w": torch.ones(1)}, "new-ledger")  # continues the write counter
    assert load_model(current).metadata["seq"] == 8 and load_state(tmp_path, 0, 6).ledger_json == "new-ledger"


def test_a_client_state_of_an_unknown_version_is_refused_not_reset(tmp_path):
    from feddistill.client.state import load_state
    from feddistill.runfolder import client_state_paths

    current, _ = client_state_paths(tmp_path, 1)
    torch.save({"model": None, "state_dict": {}, "round": 1, "seq": 0, "ledger": None, "version": 99}, current)
    with pytest.raises(RuntimeError, match="version-99 model file") as err:
        load_state(tmp_path, 1, 2)
    assert "move it away" not in str(err.value)  # that would forget the privacy the ledger has spent
    current.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="unreadable client state: move it away"):
        load_state(tmp_path, 1, 2)


def test_run_folder_paths():
    run = RunFolder("/runs/x")
    assert run.results == Path("/runs/x/results.json") and run.upload(7) == Path("/runs/x/audit/uploads/round0007.npz")
    assert run.local_student(2) == Path("/runs/x/audit/clients/client2.pt")
    assert run.release_model("r0001") == run.root / RunFolder.release_file("r0001") == Path("/runs/x/releases/r0001.pt")
    assert run.export("r0001") == Path("/runs/x/exports/r0001") and run.baseline("dp-fedavg").name == "dp-fedavg"
    with pytest.raises(ValueError):
        run.baseline("median")


def test_what_the_writers_write_is_what_the_auditor_reads(tmp_path):
    """The run's writers (server outputs, the client's local student) and the audit's reader meet
    in the schema: a run folder written by the first is read back by the second."""
    from types import SimpleNamespace

    import numpy as np

    from feddistill.client.distill import save_local_student
    from feddistill.config import parse_config
    from feddistill.data.fleet import load_fleet
    from feddistill.models import build_model
    from feddistill.privacy.audit.artifacts import load_run
    from feddistill.privacy.plan import run_privacy
    from feddistill.server.outputs import save_audit_setup, save_privacy_plan, save_student, save_uploads, write_json

    cfg = parse_config(
        {
            "rounds": 1,
            "output-dir": str(tmp_path),
            "fleet": {"num-clients": 3, "fraction": 1.0},
            "audit": {"keep-artifacts": True, "canaries": 5, "canary-client": 0},
        },
        "test",
    )
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    run, classes = RunFolder(tmp_path), fleet.num_classes
    save_audit_setup(run, cfg)
    save_privacy_plan(run, run_privacy(cfg))
    save_student(
        build_model(cfg.distill.server_student, fleet.image_size, classes, seed=0),
        run.global_student,
        cfg,
        release="r0001",
        temperature=1.25,
    )
    for pid in range(3):
        save_local_student(build_model(cfg.student_for(pid), fleet.image_size, classes, seed=pid), cfg, pid)
    answers = [np.full((10, classes), 1 / classes, dtype=np.float32) for _ in range(3)]
    save_uploads(run.upload(1), np.arange(10), SimpleNamespace(senders=[0, 1, 2], answers=answers))
    write_json(
        run.results,
        {
            "method": "feddistill",
            "config": cfg.to_dict(),
            "reference_digest": fleet.splits.reference_digest,
            "rounds": [],
            "privacy": {"client_level": None, "record_level": None},
        },
    )
    art = load_run(tmp_path)
    assert art.global_student[0] == cfg.distill.server_student and load_model(run.global_student).metadata == {
        "temperature": 1.25,
        "release": "r0001",
    }
    assert sorted(art.uploads) == [0, 1, 2] and art.uploads[1].rounds == [1]
    assert sorted(art.client_students) == [0, 1, 2] and art.canaries is not None and art.canaries.client == 0
    assert art.privacy == {"record_level": None, "client_level": None} and not art.warnings
