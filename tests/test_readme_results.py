"""The README's measured tables say what the committed benchmark files say (the digits quick
start's among them: bench/results/quickstart/quickstart.json, from a real quick start)."""

from __future__ import annotations

from pathlib import Path

from bench.readme import BLOCK, RESULTS, ROOT, render


def test_every_bench_block_in_the_readme_matches_its_json():
    blocks = list(BLOCK.finditer((ROOT / "README.md").read_text()))
    assert blocks, "README.md has no <!-- bench:NAME --> blocks"
    for m in blocks:
        expected = render(m.group("name"))
        assert expected is not None, f"README block {m.group('name')!r} has no {RESULTS}/{m.group('name')}/*.json"
        assert m.group("body") == expected, f"README block {m.group('name')!r} is stale: run `python -m bench readme`"


# ---- the digits quick start's table: figures of a real quick start, its config the quick start's own


def _flat(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key.replace('-', '_')}."))
        else:
            out[f"{prefix}{key.replace('-', '_')}"] = value
    return out


def test_the_quickstart_figures_come_from_a_run_of_configs_digits_toml():
    """Every key configs/digits.toml sets has its value in the recorded run's config: after a
    change to the quick start's config, its README figures are stale (rerun
    `bash scripts/quickstart.sh --record`)."""
    import json
    import tomllib

    recorded = _flat(json.loads((RESULTS / "quickstart" / "quickstart.json").read_text())["config"])
    wanted = _flat(tomllib.loads((ROOT / "configs" / "digits.toml").read_text()))
    stale = {k: (v, recorded.get(k)) for k, v in wanted.items() if recorded.get(k) != v}
    assert not stale, (
        f"configs/digits.toml (value, recorded) differ: {stale}; rerun `bash scripts/quickstart.sh --record`"
    )


def _fake_quickstart(run: Path, *, audit: bool) -> None:
    import json

    from feddistill.config import load_config

    cfg = load_config(ROOT / "configs" / "digits.toml").to_dict()
    results = {
        "method": "feddistill",
        "config": cfg,
        "config_digest": "d" * 64,
        "validation": {"size": 20},
        "public_teacher": {"model": "cnn-large", "test_accuracy": 0.811},
        "public_only_student": {"test_accuracy": 0.622},
        "final": {
            "student_accuracy": 0.933,
            "released_id": "r0009",
            "released_accuracy": 0.911,
            "bytes_per_client_round": 9128.0,
            "private_gain": 11.1,
            "gap_closed": 0.75,
            "fleet_labelled_rows": 401,
        },
        "baselines": {
            "public_control": {"accuracy": 0.822, "rounds": 10},
            "local_only": {"accuracy_mean": 0.505, "clients_evaluated": list(range(10))},
            "centralized": {"accuracy": 0.955},
            "fedavg": {"accuracy": 0.877, "init": "public", "bytes_per_client_round": 105256},
        },
    }
    (run / "audit-report").mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    if audit:
        summary = {"auc": 0.61, "tpr_at_fpr": {"0.001": {"tpr": 0.031}}}
        (run / "audit-report" / "audit.json").write_text(
            json.dumps(
                {
                    "targets": {
                        "global": {"best_auc_attack": "rmia", "attacks": {"rmia": {"summary": summary}}},
                        "local_client0": {"skipped": True},
                    },
                    "epsilon_lower_bounds": [{"epsilon_lower_bound": 0.0}, {"epsilon_lower_bound": 0.41}],
                    "is_dp": False,
                    "dp_violations": [],
                    "verdict": {"passed": True},
                    "timings_s": {"total": 9.2},
                }
            )
        )


def test_the_quickstart_table_says_what_its_run_folder_says(tmp_path):
    from bench.readme import quickstart, record_quickstart

    _fake_quickstart(tmp_path / "run", audit=True)
    path = record_quickstart(tmp_path / "run", tmp_path / "results", seconds=125)
    table = quickstart(__import__("json").loads(path.read_text()))
    for row in (
        "| **feddistill global student** (released: r0009) | **91.1 %** | 9.1 KB |",
        "| public teacher only (`cnn-large` on 80 labelled; 20 held out for the release gate) | 81.1 % | – |",
        "| student distilled from the public teacher alone (round 0) | 62.2 % | – |",
        "| **public-only control** (the same server pipeline, 10 rounds, no fleet answers) | 82.2 % | – |",
        "| local-only (mean of 10 clients) | 50.5 % | – |",
        "| centralized (pooled private data) | 95.5 % | – |",
        "| Flower FedAvg (pretrained on all 100 labelled, same fleet and rounds) | 87.7 % | 105.3 KB |",
    ):
        assert row in table.splitlines(), row
    assert "**+11.1 points**" in table and "gap closed between the control and pooling all private data: 75 %" in table
    assert "401 of the 450 reference rows" in table and "2.1 min" in table
    assert "The last round's student scored 93.3 %; the release gate kept r0009" in table  # released != last round
    assert "best AUC 0.61 (global), TPR at 0.1 % FPR ≤ 0.031, largest empirical ε lower bound 0.41" in table
    assert "policy passed" in table


def test_the_quickstart_table_without_an_audit(tmp_path):
    from bench.readme import quickstart, quickstart_summary

    _fake_quickstart(tmp_path / "run", audit=False)
    summary = quickstart_summary(tmp_path / "run")
    assert summary["audit"] is None and summary["wall_seconds"] is None
    table = quickstart(summary)
    assert "AUC" not in table and "time not recorded" in table
