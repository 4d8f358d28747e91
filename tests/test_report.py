"""`feddistill report`: one self-contained HTML page with every section, inline PNGs only."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from typer.testing import CliRunner

from feddistill.cli import cli
from feddistill.report import REPORT_SECTIONS, write_html_report


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self.stylesheets = 0
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "a":
            self.links.append(a.get("href", ""))
        elif tag == "script":
            self.scripts += 1
        elif tag == "link":
            self.stylesheets += 1


def _round(rnd: int, **extra) -> dict:
    return {
        "round": rnd,
        "clients": 5,
        "replies": 4,
        "dropped": {"dropped out": 1} if rnd == 2 else {},
        "over_budget_skipped": 0,
        "answered_queries": 200,
        "teacher_accuracy": 0.8 + rnd / 100,
        "student_accuracy": 0.7 + rnd / 100,
        "student_nll": 0.9,
        "student_ece": 0.1,
        "agreement": 0.9,
        "per_class_accuracy": [0.5 + c / 40 for c in range(10)],
        "drift_kl": None if rnd == 1 else 0.05 * rnd,
        "drift_alert": "teacher-signal drift: KL(new || previous) = 0.1500 > threshold 0.12" if rnd == 3 else None,
        "release": {"candidate": f"r{rnd:04d}", "promoted": rnd != 3, "reason": "x", "current": "r0002"},
        "released_accuracy": 0.72,
        "bytes_uploaded": 4000 * rnd,
        "client_epsilon": 0.5 * rnd,
        "seconds": 1.0,
        **extra,
    }


def _release(rnd: int, status: str) -> dict:
    cal = {
        "temperature": 1.5,
        "fitted_on": "public validation split",
        "before": {
            "validation": {"ece": 0.2, "nll": 0.9, "accuracy": 0.7},
            "test": {"ece": 0.18, "nll": 0.8, "accuracy": 0.7},
        },
        "after": {
            "validation": {"ece": 0.05, "nll": 0.7, "accuracy": 0.7},
            "test": {"ece": 0.06, "nll": 0.7, "accuracy": 0.7},
        },
        "reliability_test": {
            k: {
                "edges": [i / 10 for i in range(11)],
                "count": [0] * 5 + [10] * 5,
                "confidence": [0.0] * 5 + [0.6, 0.7, 0.8, 0.9, 0.95],
                "accuracy": [0.0] * 5 + [0.5, 0.6, 0.7, 0.8, 0.9],
            }
            for k in ("before", "after")
        },
    }
    return {
        "id": f"r{rnd:04d}",
        "round": rnd,
        "parent": None if rnd == 0 else "r0000",
        "status": status,
        "reason": "regression: validation accuracy" if status == "rejected" else "no regression",
        "reference_digest": "d" * 64,
        "config_digest": "c" * 64,
        "model": "mlp",
        "validation": {"accuracy": 0.7, "ece": 0.1, "nll": 0.8, "agreement": 0.9},
        "test": {"accuracy": 0.72, "nll": 0.8, "ece": 0.1},
        "client_epsilon": 0.5 * rnd,
        "record_epsilon": None,
        "calibration": cal if status == "promoted" else None,
        "path": f"releases/r{rnd:04d}.pt" if status == "promoted" else None,
    }


def _results() -> dict:
    from feddistill.config import RunConfig

    releases = [_release(0, "promoted"), _release(1, "promoted"), _release(2, "promoted"), _release(3, "rejected")]
    return {
        "method": "feddistill",
        "config": RunConfig().to_dict(),
        "config_digest": "c" * 64,
        "reference_digest": "d" * 64,
        "public_teacher": {"model": "cnn-large", "test_accuracy": 0.75, "test_nll": 1.0, "test_ece": 0.1},
        "public_only_student": {"test_accuracy": 0.7, "test_nll": 1.0, "test_ece": 0.1},
        "rounds": [_round(r) for r in (1, 2, 3)],
        "final": {
            "student_accuracy": 0.73,
            "student_nll": 0.9,
            "student_ece": 0.1,
            "agreement": 0.9,
            "released_id": "r0002",
            "released_accuracy": 0.72,
            "bytes_uploaded_total": 24000,
            "bytes_per_client_round": 2000,
        },
        "stop_reason": None,
        "validation": {"split": "held-out part of the labelled public sample", "size": 20},
        "releases": {"current": "r0002", "releases": releases},
        "calibration": releases[2]["calibration"],
        "drift": {"kl_threshold": 0.12, "alerts": [{"round": 3, "alert": "teacher-signal drift"}]},
        "privacy": {
            "client_level": {
                "epsilon": 1.5,
                "delta": 1e-5,
                "unit": "client",
                "mechanism": "Gaussian",
                "accountant": "pld",
            },
            "record_level": None,
        },
        "baselines": {
            "local_only": {"accuracy_mean": 0.4},
            "centralized": {"accuracy": 0.95},
            "fedavg": {
                "accuracy": 0.6,
                "bytes_per_client_round": 90000,
                "init": "public",
                "rounds": [{"round": r, "student_accuracy": 0.5 + r / 20} for r in (1, 2, 3)],
            },
        },
    }


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def test_report_has_every_section_and_only_inline_images(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    (tmp_path / "audit-report").mkdir()
    (tmp_path / "audit-report" / "report.md").write_text("# audit\n")
    (tmp_path / "audit-report" / "audit.json").write_text(json.dumps({"verdict": {"passed": False}}))
    path = write_html_report(tmp_path)
    assert path == tmp_path / "report.html"
    page = _parse(path)
    assert page.sections == list(REPORT_SECTIONS)
    assert {
        "summary",
        "accuracy",
        "privacy",
        "communication",
        "faults",
        "releases",
        "drift",
        "calibration",
        "audit",
    } <= set(page.sections)
    # accuracy, epsilon, bytes, drops, drift, per-class accuracy, reliability: all inline PNG data URIs
    assert len(page.images) == 7
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert page.scripts == 0 and page.stylesheets == 0
    assert "audit-report/report.md" in page.links
    assert all(not link.startswith(("http:", "https:", "//")) for link in page.links)
    html = path.read_text()
    for text in (
        "Releases and rollbacks",
        "r0003",
        "rejected",
        "teacher-signal drift",
        "T = 1.500",
        "Flower FedAvg",
        "centralized",
        "dropped out",
        "Policy: <b>FAILED</b>",
        "&epsilon; = 1.500",
    ):
        assert text in html, text


def test_report_without_audit_or_privacy_says_so_and_cli_errors_are_clear(tmp_path):
    results = _results()
    results["privacy"] = {"client_level": None, "record_level": None}
    for r in results["rounds"]:
        r["client_epsilon"] = None
    (tmp_path / "results.json").write_text(json.dumps(results))
    runner = CliRunner()
    out = tmp_path / "elsewhere" / "r.html"
    result = runner.invoke(cli, ["report", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "No audit has run on this folder" in html and "no &epsilon; is claimed" in html
    assert _parse(out).sections == list(REPORT_SECTIONS)

    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(cli, ["report", str(empty)])
    assert result.exit_code == 2 and "results.json: not found" in result.output
    (empty / "results.json").write_text("{broken")
    result = runner.invoke(cli, ["report", str(empty)])
    assert result.exit_code == 2 and "corrupt" in result.output
