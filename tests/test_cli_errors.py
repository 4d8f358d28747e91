"""Every user mistake the CLI can name is one line on stderr with exit code 2, never a traceback.

Run as a user runs it: the installed ``feddistill`` script in a subprocess, stderr not a
terminal. Every case fails before a simulation (or any training) starts, so each takes about
the interpreter's start-up time. Also here: what ``--overwrite`` deletes and what it refuses to.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from feddistill.config import RunConfig
from feddistill.runfolder import RUN_ENTRIES, RunFolderError, clear_run_folder, prepare_run_folder

pytestmark = pytest.mark.e2e(seconds=15)

FEDDISTILL = str(Path(sys.executable).parent / "feddistill")


def _run_folder(path: Path, *entries: str) -> Path:
    """A folder as a finished run leaves it: config.json + results.json naming the method."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(RunConfig(output_dir=str(path)).to_dict()))
    for name in entries:
        if name.endswith("/"):
            (path / name).mkdir()
            (path / name / "client0.pt").write_bytes(b"old state")
        else:
            (path / name).write_text(json.dumps({"method": "feddistill"}))
    return path


def _read_only_dir(tmp: Path) -> Path:
    """A folder nobody may create files in; root ignores permission bits, so it gets /sys."""
    if os.geteuid() == 0:
        return Path("/sys/feddistill-test-run")
    ro = tmp / "read-only"
    ro.mkdir()
    ro.chmod(0o500)
    return ro / "run"


def _release_run(tmp: Path) -> Path:
    """The smallest run folder that `export` accepts up to its --out check: one promoted release."""
    import torch

    from feddistill.models import build_model
    from feddistill.server.gate import PROMOTED, Release, ReleaseHistory, save_index, save_release_model

    run = _run_folder(tmp / "run", "results.json")
    release = Release(
        id="r0000",
        round=0,
        parent=None,
        status=PROMOTED,
        reason="first release",
        reference_digest="0" * 64,
        config_digest="0" * 64,
        model="mlp",
        validation={},
        test={},
        client_epsilon=None,
        record_epsilon=None,
    )
    release.path = save_release_model(run, release, build_model("mlp", 8, 10).state_dict(), 1.0)
    save_index(run, ReleaseHistory([release], current="r0000"))
    assert torch.load(run / release.path, weights_only=True)["model"] == "mlp"
    return run


# (case id, setup(tmp) -> argv, what stderr must say); setup may create files under tmp
Case = tuple[str, Callable[[Path], list[str]], str]


def _binary_config(tmp: Path) -> list[str]:
    (tmp / "model.toml").write_bytes(b"\x80\x04\x95binary\x00\xff")
    return ["simulate", "--config", str(tmp / "model.toml")]


def _file(tmp: Path) -> Path:
    (tmp / "notes.txt").write_text("mine")
    return tmp / "notes.txt"


CASES: list[Case] = [
    ("config-binary", _binary_config, "model.toml: not a text file"),
    ("config-directory", lambda tmp: ["simulate", "--config", str(tmp)], "{tmp}: is a directory, not a config file"),
    (
        "set-typo-blames-set",
        lambda tmp: ["simulate", "--config", "configs/digits.toml", "--set", "fleet.num-clinets=3"],
        "error: --set: unknown key 'fleet.num-clinets'",
    ),
    (
        "set-bad-value-blames-set",
        lambda tmp: ["simulate", "--config", "configs/digits.toml", "--set", "fleet.alpha=-1"],
        "error: --set: 'fleet.alpha' = -1.0 must be > 0",
    ),
    ("out-is-a-file", lambda tmp: ["simulate", "--out", str(_file(tmp))], "notes.txt: is a file, not a folder"),
    (
        "out-under-a-file",
        lambda tmp: ["simulate", "--out", str(_file(tmp) / "run")],
        "notes.txt/run: cannot be a folder: {tmp}/notes.txt is a file",
    ),
    ("out-read-only", lambda tmp: ["simulate", "--out", str(_read_only_dir(tmp))], ": cannot write there"),
    (
        "out-holds-a-run",
        lambda tmp: ["simulate", "--out", str(_run_folder(tmp / "old", "results.json"))],
        "{tmp}/old: holds an earlier run (results.json, config.json); continue it with `feddistill simulate "
        "--resume {tmp}/old`, or replace it with --overwrite",
    ),
    (
        "out-holds-client-state",
        lambda tmp: ["simulate", "--out", str(_run_folder(tmp / "old", "clients/"))],
        "holds an earlier run (config.json, clients)",
    ),
    ("config-output-dir-holds-a-run", lambda tmp: _output_dir_config(tmp), "{tmp}/old: holds an earlier run"),
    ("overwrite-refuses-foreign-files", lambda tmp: _foreign(tmp), "{tmp}/old: not cleared: it also holds thesis.tex"),
    (
        "resume-and-overwrite",
        lambda tmp: ["simulate", "--resume", str(_run_folder(tmp / "old")), "--overwrite"],
        "--resume and --overwrite exclude each other",
    ),
    (
        "export-out-is-a-file",
        lambda tmp: ["export", str(_release_run(tmp)), "--release", "r0000", "--out", str(_file(tmp))],
        "notes.txt: is a file, not a folder",
    ),
    (
        "report-out-is-a-directory",
        lambda tmp: ["report", str(tmp), "--out", str(tmp)],
        "{tmp}: is a directory; --out takes the HTML file to write",
    ),
    (
        "certs-negative-supernodes",
        lambda tmp: ["certs", "--out", str(tmp / "c"), "--supernodes", "-1"],
        "--supernodes -1: must be >= 0",
    ),
    (
        "certs-bad-host",
        lambda tmp: ["certs", "--out", str(tmp / "c"), "--host", "bad host!"],
        "host 'bad host!': not an IP address or a DNS host name",
    ),
    ("certs-out-is-a-file", lambda tmp: ["certs", "--out", str(_file(tmp))], "notes.txt: is a file, not a folder"),
    (
        "audit-policy-directory",
        lambda tmp: ["audit", str(tmp), "--policy", str(tmp)],
        "{tmp}: is a directory, not a policy file",
    ),
    (
        "deploy-config-directory",
        lambda tmp: ["deploy-local", str(tmp / "d"), "--config", str(tmp)],
        "{tmp}: is a directory, not a config file",
    ),
]


def _output_dir_config(tmp: Path) -> list[str]:
    _run_folder(tmp / "old", "results.json")
    (tmp / "run.toml").write_text(f'output-dir = "{tmp / "old"}"\n')
    return ["simulate", "--config", str(tmp / "run.toml")]


def _foreign(tmp: Path) -> list[str]:
    old = _run_folder(tmp / "old", "results.json")
    (old / "thesis.tex").write_text("not a run's")
    return ["simulate", "--out", str(old), "--overwrite"]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_error_is_one_line_exit_2_no_traceback(case: Case, tmp_path: Path) -> None:
    _, setup, expected = case
    argv = setup(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    proc = subprocess.run(
        [FEDDISTILL, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "COLUMNS": "60"},
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # a narrow terminal width must not wrap it either
    assert expected.format(tmp=tmp_path) in lines[0]
    # refusing touched nothing: no run folder was cleared, no file replaced
    assert [p for p in before if not Path(p).exists()] == []


# ---- what --overwrite deletes (in-process: these need no CLI) ----


def test_overwrite_deletes_exactly_what_runs_write(tmp_path: Path) -> None:
    run = _run_folder(
        tmp_path / "run",
        "results.json",
        "clients/",
        "releases/",
        "audit/",
        "audit-report/",
        "exports/",
        "fedavg/",
        "checkpoint.pt",
        "ledger-journal.jsonl",
        "report.html",
    )
    (run / ".results.0123456789ab.tmp.json").write_text("{")  # a killed atomic write
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("keep")
    (run / "global_student.pt").symlink_to(tmp_path / "elsewhere" / "keep.txt")  # a link: removed, not followed
    with pytest.raises(RunFolderError, match="holds an earlier run"):
        prepare_run_folder(run)
    assert prepare_run_folder(run, overwrite=True) == run
    assert list(run.iterdir()) == []
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "keep"
    assert prepare_run_folder(run) == run  # now an empty folder: a new run may start


def test_overwrite_refuses_folders_that_are_not_runs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.json").write_text('{"editor": "vim"}')  # someone else's config.json
    with pytest.raises(RunFolderError, match="config.json was not written by a feddistill run"):
        clear_run_folder(home)
    assert (home / "config.json").is_file()
    with pytest.raises(RunFolderError, match="holds no feddistill run"):
        clear_run_folder(tmp_path / "nothing-here")
    empty = tmp_path / "empty"
    assert prepare_run_folder(empty, overwrite=True) == empty and empty.is_dir()  # nothing to clear


def test_run_entries_cover_what_a_run_writes() -> None:
    """The names a run writes, from the code that writes them: a new artefact must be added
    to RUN_ENTRIES, or --overwrite would refuse every folder that holds it."""
    from feddistill.runfolder import RELEASES as RELEASES_DIR
    from feddistill.server.checkpoint import CHECKPOINT, JOURNAL

    assert {
        CHECKPOINT,
        JOURNAL,
        RELEASES_DIR,
        "config.json",
        "privacy-plan.json",
        "results.json",
        "clients",
        "audit",
        "global_student.pt",
        "accuracy.png",
        "reliability.png",
        "fedavg",
        "dp-fedavg",
    } <= RUN_ENTRIES


# ---- the same refusal where the ServerApp starts (`flwr run .` reads output-dir from its run config) ----


def _flwr_context(output_dir: Path):
    from flwr.app import Context, RecordDict

    return Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={**RunConfig().to_flat(), "output-dir": str(output_dir)},
    )


@pytest.mark.parametrize("where", ["holds-a-run", "is-a-file"])
def test_server_app_refuses_before_it_touches_the_grid(
    where: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No grid is needed to fail: the check comes first. The error is one line, logged once,
    and it is what Flower reports as the run's failure."""
    from feddistill.server.app import make_server_app, run_distillation

    target = _run_folder(tmp_path / "old", "results.json") if where == "holds-a-run" else _file(tmp_path)
    log = logging.getLogger("feddistill")
    handlers, level = list(log.handlers), log.level
    try:  # under flwr run the ServerApp adds its own stderr handler: keep it out of later tests
        with caplog.at_level("ERROR", logger="feddistill"), pytest.raises(RunFolderError) as info:
            make_server_app()(None, _flwr_context(target))
    finally:
        log.handlers[:] = handlers
        log.setLevel(level)
    message = str(info.value)
    assert "\n" not in message and str(target) in message
    if where == "holds-a-run":
        assert "choose a fresh output-dir" in message
    assert [r.getMessage() for r in caplog.records if r.name == "feddistill"] == [message]
    # nothing stacked under it: no chained exception, and a stack of a few frames, not the run loop's
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert len(info.traceback) <= 4
    # the distillation loop itself refuses too (`feddistill simulate` and in-process callers)
    with pytest.raises(RunFolderError, match="holds an earlier run|is a file"):
        run_distillation(None, RunConfig(output_dir=str(target)))
