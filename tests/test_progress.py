"""Progress of the long steps outside the rounds (issue 17, item 7): the public teacher's
training, the simulation's baselines and the audit show a live bar on a terminal and a few
plain lines anywhere else (a pipe, a CI log, this test's capture), never control characters."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import torch

from feddistill.config import load_config
from feddistill.console import make_console, progress, training_progress

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but tab and newline: \r, ESC, ...

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture(autouse=True)
def _not_a_terminal(monkeypatch):
    for var in ("FORCE_COLOR", "FORCE_TERMINAL", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(var, raising=False)


def _plain(text: str) -> list[str]:
    assert text and not CONTROL.search(text), repr(text)
    return text.splitlines()


def test_plain_output_is_a_few_lines_at_milestones():
    out = _Pipe()
    with progress("work", 10, unit="clients", console=make_console(file=out)) as bar:
        for _ in range(10):
            bar.advance()
    lines = _plain(out.getvalue())
    assert lines[0] == "work: 0/10 clients"
    assert [re.sub(r" \(.*\)$", "", line) for line in lines[1:]] == [
        "work: 3/10 clients",
        "work: 5/10 clients",
        "work: 8/10 clients",
        "work: 10/10 clients",
    ]


def test_plain_output_of_a_task_told_by_its_phases():
    out = _Pipe()
    with progress("audit", 2, console=make_console(file=out), lines=0) as bar:
        bar.phase("client 0")
        bar.advance()
        bar.phase("global student")
        bar.advance()
    lines = _plain(out.getvalue())
    assert lines[0] == "audit: 0/2 steps, client 0"
    assert lines[1].startswith("audit: 1/2 steps, global student (") and lines[2].startswith("audit: 2/2 steps (")
    assert len(lines) == 3


def test_a_task_that_fails_is_not_shown_complete():
    out = _Pipe()
    with pytest.raises(RuntimeError), progress("work", 4, console=make_console(file=out)) as bar:
        bar.advance()
        raise RuntimeError("boom")
    assert "4/4" not in out.getvalue()


def test_a_terminal_gets_a_live_bar():
    out = io.StringIO()
    console = make_console(file=out)
    console._force_terminal = True  # as on a terminal
    with progress("outer", 2, unit="epochs", console=console) as outer:
        with progress("inner", 3, console=console) as inner:  # nested: a row of the same display
            inner.advance(3)
        outer.advance(2)
    text = out.getvalue()
    assert "━" in text and "outer" in text and "inner" in text and "2/2 epochs" in text


def test_counting_batches_does_not_change_the_training():
    from feddistill.models import build_model
    from feddistill.training import train_supervised

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 1, 8, 8, generator=g), torch.randint(0, 10, (50,), generator=g)
    plain, watched = build_model("mlp", 8, 10, seed=1), build_model("mlp", 8, 10, seed=1)
    train_supervised(plain, x, y, epochs=3, batch_size=16, lr=0.05, seed=2)
    out = _Pipe()
    with training_progress(watched, "mlp", epochs=3, rows=50, batch_size=16, console=make_console(file=out)) as bar:
        train_supervised(watched, x, y, epochs=3, batch_size=16, lr=0.05, seed=2)
        assert bar.completed == 3  # 4 batches an epoch, counted
    assert not watched._forward_pre_hooks  # the hook is gone
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values()):
        assert torch.equal(a, b)


def _cfg(tmp_path: Path, **overrides):
    return load_config(None, {"output_dir": str(tmp_path / "run"), "fleet.num_clients": 4, **overrides})


def test_public_teacher_training_prints_plain_progress(tmp_path, monkeypatch, capsys):
    from feddistill.data.fleet import load_fleet
    from feddistill.server.teacher import public_teacher

    monkeypatch.setenv("FEDDISTILL_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tmp_path, **{"teacher.model": "mlp", "teacher.epochs": 4})
    splits = load_fleet(cfg.data, cfg.fleet, cfg.seed).splits
    public_teacher(cfg.teacher, splits, cfg.seed)
    err = capsys.readouterr().err
    lines = [line for line in _plain(err) if line.startswith("public teacher (mlp, 100 labelled)")]
    assert lines[0] == "public teacher (mlp, 100 labelled): 0/4 epochs"
    # one line per milestone, reached while it trained (the last one too, not only at the end)
    assert [re.sub(r" \(\d+ s\)$", "", line).rsplit(": ", 1)[1] for line in lines[1:]] == [
        "1/4 epochs",
        "2/4 epochs",
        "3/4 epochs",
        "4/4 epochs",
    ]
    public_teacher(cfg.teacher, splits, cfg.seed)  # from the cache: nothing trains, nothing to show
    assert "epochs" not in capsys.readouterr().err


def test_baselines_print_plain_progress(tmp_path, capsys):
    from feddistill.data.fleet import load_fleet
    from feddistill.simulations import baselines

    cfg = _cfg(tmp_path, **{"baselines.local_epochs": 2})
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    baselines.local_only(cfg, fleet)
    baselines.centralized(cfg, fleet)
    lines = _plain(capsys.readouterr().err)
    assert lines[0] == "baseline local-only (2 epochs each): 0/4 clients"
    assert re.fullmatch(r"baseline local-only \(2 epochs each\): 4/4 clients \(\d+ s\)", lines[4])
    central = [line for line in lines if line.startswith("baseline centralized")]
    assert central[0].endswith(": 0/2 epochs") and re.search(r": 2/2 epochs \(\d+ s\)$", central[-1])


def test_the_audit_prints_its_phases(tmp_path, capsys):
    from feddistill.privacy.audit.runner import run_audit
    from test_audit_run import CHEAP, build_run

    build_run(tmp_path / "run", num_clients=3, epochs=5, canaries=10)
    capsys.readouterr()
    run_audit(tmp_path / "run", options=CHEAP)
    lines = [line for line in _plain(capsys.readouterr().err) if line.startswith("audit of run:")]
    phases = [re.sub(r" \(\d+ s\)$", "", line.split(": ", 1)[1]) for line in lines]
    assert phases == [
        "0/4 steps, client 0 (uploads, local student)",
        "1/4 steps, global student",
        "2/4 steps, canaries (client 0)",
        "3/4 steps, label inference and report",
        "4/4 steps",
    ]


def test_the_client_app_never_imports_the_console():
    """Progress is for whoever watches a server, a simulation or an audit: a device's ClientApp
    neither shows it nor imports it (static import graph, lazy imports included)."""
    from test_import_graph import import_graph

    graph = import_graph()
    seen, todo = set(), ["feddistill.client.app"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += graph.get(module, ())
    assert "feddistill.console" not in seen
    assert "feddistill.server.teacher" not in seen and "feddistill.simulations.baselines" not in seen
