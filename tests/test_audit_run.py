"""`feddistill audit RUN_DIR` end to end on tiny run directories.

The run directories are made in-process without Flower: the same data, canaries,
models and training loops as a simulation, written in the layout a run with
``audit.keep-artifacts = true`` leaves (results.json, global_student.pt,
audit/uploads/roundNNNN.npz, audit/clients/client{pid}.pt, audit/canaries.npz).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from feddistill.config import parse_config
from feddistill.data.fleet import fleet_canaries, load_fleet, training_data
from feddistill.models import build_model
from feddistill.privacy.audit.runner import (
    AuditInputError,
    AuditOptions,
    claims_for_targets,
    load_run,
    main,
    run_audit,
)
from feddistill.privacy.audit.targets import matched_members
from feddistill.privacy.plan import run_privacy
from feddistill.runfolder import RunFolder
from feddistill.server.outputs import save_privacy_plan
from feddistill.training import predict_probs, train_distill, train_supervised

CHEAP = AuditOptions(reference_models=2, target_clients=1, max_points=100)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_run(out: Path, *, num_clients: int, epochs: int, canaries: int, privacy=None) -> None:
    """One round of federated distillation, every client answering, no DP: each client
    overfits its tiny private set (plus the included canaries for client 0)."""
    cfg = parse_config(
        {
            "rounds": 1,
            "output-dir": str(out),
            "fleet": {"num-clients": num_clients, "fraction": 1.0, "partition": "dirichlet", "alpha": 0.5},
            "distill": {"revisit-epochs": epochs, "digest-epochs": 0, "server-epochs": 10},
            "audit": {"keep-artifacts": True, "canaries": canaries, "canary-client": 0},
        },
        "test",
    )
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    canary_set = fleet_canaries(cfg)
    ref_x = torch.from_numpy(fleet.splits.reference.x)
    queries = np.arange(len(ref_x), dtype=np.int64)
    (out / "audit" / "clients").mkdir(parents=True)
    (out / "audit" / "uploads").mkdir(parents=True)
    answers = {}
    for pid in range(num_clients):
        x, y = training_data(fleet, pid, canary_set)
        arch = cfg.student_for(pid)
        model = build_model(arch, fleet.image_size, fleet.num_classes, seed=pid)
        train_supervised(model, x, y, epochs=epochs, batch_size=cfg.distill.batch_size, lr=cfg.distill.lr, seed=pid)
        answers[f"client{pid}"] = predict_probs(model, ref_x).numpy().astype(np.float16)
        torch.save({"model": arch, "state_dict": model.state_dict()}, out / "audit" / "clients" / f"client{pid}.pt")
    np.savez_compressed(out / "audit" / "uploads" / "round0001.npz", queries=queries, **answers)
    signal = torch.from_numpy(np.mean([a.astype(np.float32) for a in answers.values()], axis=0))
    student = build_model(cfg.distill.server_student, fleet.image_size, fleet.num_classes, seed=0)
    train_distill(
        student,
        ref_x,
        signal,
        temperature=cfg.distill.temperature,
        epochs=cfg.distill.server_epochs,
        batch_size=cfg.distill.batch_size,
        lr=cfg.distill.server_lr,
    )
    torch.save({"model": cfg.distill.server_student, "state_dict": student.state_dict()}, out / "global_student.pt")
    if canary_set is not None:
        np.savez_compressed(
            out / "audit" / "canaries.npz",
            x=canary_set.x,
            y=canary_set.y,
            included=canary_set.included,
            client=canary_set.client,
        )
    results = {
        "method": "feddistill",
        "config": cfg.to_dict(),
        "config_digest": cfg.digest(),
        "reference_digest": fleet.splits.reference_digest,
        "rounds": [{"round": 1, "replies": num_clients}],
        "privacy": privacy,
    }
    (out / "results.json").write_text(json.dumps(results))
    save_privacy_plan(RunFolder(out), run_privacy(cfg))


@pytest.fixture(scope="module")
def leaky_run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("leaky") / "run"
    build_run(run, num_clients=16, epochs=150, canaries=50)
    return run


def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("audit-report*"))
    return dst


def _set_privacy(run: Path, privacy) -> None:
    results = json.loads((run / "results.json").read_text())
    results["privacy"] = privacy
    (run / "results.json").write_text(json.dumps(results))


def _policy(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "policy.toml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def leaky_audit(leaky_run, tmp_path_factory):
    policy = tmp_path_factory.mktemp("policy") / "strict.toml"
    policy.write_text("max_auc = 0.6\nmax_tpr_at_0_1pct_fpr = 0.5\n")
    out = leaky_run / "audit-report"
    audit, code = run_audit(
        leaky_run, policy_path=policy, options=AuditOptions(reference_models=4, target_clients=1, max_points=200)
    )
    return audit, code, out


# --------------------------------------------------------------------------- (1) leaky run flagged
def test_leaky_run_is_flagged_and_strict_policy_fails(leaky_audit):
    audit, code, _ = leaky_audit
    assert audit["target_clients"] == [0]  # the canary client comes first
    local = audit["targets"]["local_client0"]
    best_auc = max(a["summary"]["auc"] for a in local["attacks"].values())
    assert best_auc > 0.6, local["attacks"]
    assert set(local["attacks"]) == {"loss", "lira_offline", "lira_online", "rmia", "rmia_offline"}
    # members and non-members are class-matched: equal counts per class
    for row in local["per_class"].values():
        assert row["n_members"] == row["n_nonmembers"]
    assert code == 1
    rules = {r["rule"]: r for r in audit["verdict"]["rules"]}
    assert rules["max_auc"]["passed"] is False
    assert rules["max_auc"]["observed"] >= best_auc
    assert rules["fail_on_dp_violation"]["passed"] is True  # no DP claimed, nothing to violate
    assert audit["dp_violations"] == []
    # every target was audited and scored
    assert {"uploads_client0", "local_client0", "global"} <= set(audit["targets"])
    # the canaries are memorised by the local student: a positive one-run lower bound
    assert audit["canary_audit"]["results"]["local"]["epsilon_lower_bound"] > 0.5


# --------------------------------------------------------------------------- (5) report and plots
def test_report_json_and_roc_plots_are_written(leaky_audit):
    audit, _, out = leaky_audit
    on_disk = json.loads((out / "audit.json").read_text())
    assert on_disk["verdict"] == audit["verdict"]
    report = (out / "report.md").read_text()
    assert "**FAILED**" in report
    assert "VERDICT: **FAIL** — `max_auc`" in report
    assert "VERDICT: PASS — `fail_on_dp_violation`" in report
    for header in ("TPR @ 0.1 % FPR", "Empirical ε lower bound", "Canary audit", "Label-distribution inference"):
        assert header in report
    for name, t in audit["targets"].items():
        assert not t.get("skipped"), name
        png = out / f"roc_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"(roc_{name}.png)" in report


# --------------------------------------------------------------------------- (6) label inference
def test_label_inference_beats_uniform_guess_on_skewed_client(leaky_audit, leaky_run):
    audit, _, _ = leaky_audit
    clients = audit["label_inference"]["clients"]
    assert len(clients) == 16
    pid, row = max(clients.items(), key=lambda kv: kv[1]["tv_uniform_guess"])  # the most skewed client
    assert row["tv_uniform_guess"] > 0.5
    assert row["tv"] < row["tv_uniform_guess"] - 0.05
    assert row["kl"] >= 0
    assert all(r["tv"] < r["tv_uniform_guess"] for r in clients.values())
    s = audit["label_inference"]["summary"]
    assert s["mean_tv"] < s["mean_tv_uniform_guess"]
    # the true histogram is the client's private labels
    art = load_run(leaky_run)
    y = art.fleet.private_data(int(pid)).y
    np.testing.assert_allclose(row["true"], np.bincount(y, minlength=10) / y.size)


# --------------------------------------------------------------------------- (3) lenient policy passes
def test_lenient_policy_passes_with_an_honest_dp_claim(leaky_run, tmp_path):
    run = _copy(leaky_run, tmp_path / "run")
    _set_privacy(
        run,
        {
            "record_level": {
                "epsilon": 50.0,
                "delta": 1e-5,
                "unit": "record",
                "mechanism": "DP-SGD",
                "accountant": "rdp",
            },
            "client_level": None,
        },
    )
    policy = _policy(
        tmp_path, "max_auc = 1.0\nmax_tpr_at_1pct_fpr = 1.0\nmax_empirical_epsilon = 40\nmin_label_tv = 0.0\n"
    )
    audit, code = run_audit(run, out_dir=tmp_path / "out", policy_path=policy, options=CHEAP)
    assert code == 0, audit["verdict"]
    assert audit["verdict"]["passed"] is True
    assert audit["dp_violations"] == []
    assert audit["targets"]["local_client0"]["claimed"]["epsilon"] == 50.0
    assert "**PASSED**" in (tmp_path / "out" / "report.md").read_text()


# --------------------------------------------------------------------------- (4) DP violation
def test_claimed_epsilon_below_canary_bound_is_a_dp_violation(leaky_run, tmp_path):
    run = _copy(leaky_run, tmp_path / "run")
    _set_privacy(
        run,
        {
            "record_level": {
                "epsilon": 0.01,
                "delta": 1e-5,
                "unit": "record",
                "mechanism": "DP-SGD",
                "accountant": "rdp",
            },
            "client_level": None,
        },
    )
    lenient = _policy(tmp_path, "max_auc = 1.0\n")  # fail_on_dp_violation stays on by default
    audit, code = run_audit(
        run,
        out_dir=tmp_path / "out",
        policy_path=lenient,
        options=AuditOptions(reference_models=0, target_clients=1, max_points=100),
    )
    assert code == 1
    sources = [v["source"] for v in audit["dp_violations"]]
    assert any(s.startswith("canaries vs local") for s in sources), sources
    local = audit["canary_audit"]["results"]["local"]
    assert local["violation"] is True and local["epsilon_lower_bound"] > 0.01
    rule = next(r for r in audit["verdict"]["rules"] if r["rule"] == "fail_on_dp_violation")
    assert rule["passed"] is False
    assert "DP VIOLATION" in (tmp_path / "out" / "report.md").read_text()
    # the CLI entry point says the same (no reference models: the canary audit alone fails it)
    assert main(str(run), str(lenient), str(tmp_path / "out2"), 0, 0) == 1


def test_dp_violation_fails_even_without_a_policy_file(leaky_run, tmp_path):
    run = _copy(leaky_run, tmp_path / "run")
    _set_privacy(
        run,
        {
            "record_level": {
                "epsilon": 0.01,
                "delta": 1e-5,
                "unit": "record",
                "mechanism": "DP-SGD",
                "accountant": "rdp",
            },
        },
    )
    audit, code = run_audit(
        run, out_dir=tmp_path / "out", options=AuditOptions(reference_models=0, target_clients=0, max_points=100)
    )
    assert code == 1 and audit["dp_violations"]


def test_canary_audit_is_skipped_with_a_warning_when_the_canary_client_never_took_part(leaky_run, tmp_path):
    run = _copy(leaky_run, tmp_path / "run")
    canary_client = load_run(run).canaries.client
    for path in (run / "audit" / "uploads").glob("round*.npz"):  # as if it was never sampled
        kept = {k: v for k, v in np.load(path).items() if k != f"client{canary_client}"}
        np.savez_compressed(path, **kept)
    (run / "audit" / "clients" / f"client{canary_client}.pt").unlink()
    art = load_run(run)
    assert art.canaries is None
    assert any("canary audit not run" in w for w in art.warnings)


# --------------------------------------------------------------------------- (2) unreadable input -> exit 2
def _rm(p: Path) -> None:
    shutil.rmtree(p) if p.is_dir() else p.unlink()


DAMAGE = {
    "results.json missing": (lambda r: _rm(r / "results.json"), "results.json"),
    "results.json corrupt": (lambda r: (r / "results.json").write_text("{not json"), "results.json"),
    "results.json without config": (lambda r: (r / "results.json").write_text("{}"), "results.json"),
    "uploads missing": (lambda r: _rm(r / "audit" / "uploads"), "uploads"),
    "upload corrupt": (lambda r: (r / "audit" / "uploads" / "round0001.npz").write_bytes(b"garbage"), "round0001.npz"),
    "audit dir missing": (lambda r: _rm(r / "audit"), "keep-artifacts"),
    "local student missing": (lambda r: _rm(r / "audit" / "clients" / "client3.pt"), "client3.pt"),
    "global student corrupt": (lambda r: (r / "global_student.pt").write_bytes(b"\x00" * 10), "global_student.pt"),
    "canaries missing": (lambda r: _rm(r / "audit" / "canaries.npz"), "canaries.npz"),
    "privacy claim malformed": (
        lambda r: _set_privacy(r, {"record_level": {"epsilon": "small"}}),
        "privacy.record_level.epsilon",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_unreadable_run_exits_2_naming_the_file(leaky_run, tmp_path, capsys, case):
    run = _copy(leaky_run, tmp_path / "run")
    damage, needle = DAMAGE[case]
    damage(run)
    with pytest.raises(AuditInputError, match=needle.replace(".", r"\.")):
        load_run(run)
    assert main(str(run), None, str(tmp_path / "out"), 2, 1) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert not (tmp_path / "out" / "audit.json").exists()


def test_missing_run_dir_and_bad_policy_exit_2(leaky_run, tmp_path, capsys):
    assert main(str(tmp_path / "nope"), None, None, 2, 1) == 2
    assert "nope" in capsys.readouterr().err
    for text, needle in (
        ("max_auc = 0.6\nmax_fpr = 1\n", "unknown policy key 'max_fpr'"),
        ("max_label_tv = 0.2\n", "min_label_tv"),
        ("max_auc = 'high'\n", "max_auc"),
        ("max_auc = [", "TOML"),
    ):
        policy = _policy(tmp_path, text)
        assert main(str(leaky_run), str(policy), str(tmp_path / "out"), 2, 1) == 2
        assert needle in capsys.readouterr().err
    assert main(str(leaky_run), str(tmp_path / "missing.toml"), None, 2, 1) == 2
    assert "policy file not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- claims and sampling
def test_claims_per_target_follow_the_unit_and_noise_placement():
    rec = {"epsilon": 3.0, "delta": 1e-5, "unit": "record", "mechanism": "DP-SGD", "accountant": "prv"}
    cli = {"epsilon": 1.0, "delta": 1e-6, "unit": "client", "mechanism": "Gaussian", "accountant": "pld"}
    c = claims_for_targets({"record_level": rec, "client_level": cli})
    assert c["local"]["epsilon"] == 3.0  # only DP-SGD protects a local student
    assert c["uploads"]["epsilon"] == 3.0  # central noise does not protect what the server received
    # add/remove client-level -> a record change is two client changes: (2 eps, (1 + e^eps) delta)
    assert c["global"]["epsilon"] == pytest.approx(2.0)
    assert c["global"]["delta"] == pytest.approx(1e-6 * (1 + np.e))
    local_noise = dict(cli, placement="local", neighbouring="replace-one")
    c = claims_for_targets({"record_level": None, "client_level": local_noise})
    assert c["local"] is None
    assert c["uploads"]["epsilon"] == 1.0 and c["global"]["epsilon"] == 1.0
    assert claims_for_targets({"record_level": None, "client_level": None}) == {
        "local": None,
        "uploads": None,
        "global": None,
    }


def test_members_and_non_members_are_matched_per_class():
    rng = np.random.default_rng(0)
    member_y = np.r_[np.zeros(50, int), np.ones(5, int), np.full(20, 2)]
    non_y = rng.integers(0, 3, 60)
    m, n = matched_members(member_y, non_y, 3, 1000, rng)
    np.testing.assert_array_equal(np.bincount(member_y[m], minlength=3), np.bincount(non_y[n], minlength=3))
    m, n = matched_members(member_y, non_y, 3, 10, rng)
    assert m.size == n.size <= 10


def test_record_claim_uses_the_clients_own_device_epsilon():
    rec = {
        "epsilon": 8.0,
        "delta": 1e-5,
        "unit": "record",
        "mechanism": "DP-SGD",
        "accountant": "pld",
        "devices": {"0": {"record-epsilon": 2.5}, "1": {"record-epsilon": 8.0}},
    }
    privacy = {"record_level": rec, "client_level": None}
    assert claims_for_targets(privacy, client=0)["local"]["epsilon"] == 2.5
    assert claims_for_targets(privacy, client=7)["local"]["epsilon"] == 8.0  # no device entry: the worst case
    assert claims_for_targets(privacy)["global"]["epsilon"] == 8.0  # a record of any client


def test_reference_answers_replay_the_runs_upload_mechanism():
    from feddistill.privacy.audit.targets import probs_of, replay_answers
    from feddistill.privacy.plan import RunPrivacy, run_privacy

    cfg = parse_config({"privacy": {"client-level": "local", "noise-multiplier": 0.5}})
    plan = RunPrivacy.from_json(run_privacy(cfg).to_json()).upload  # as the audit reads it back
    assert plan.mode == "local"
    assert plan.noise_std == pytest.approx(0.5 * np.sqrt(cfg.distill.query_size))
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    model = build_model("mlp", fleet.image_size, fleet.num_classes, seed=0)
    qx = fleet.splits.reference.x[:64]
    counts = np.full(64, 4)
    rng = np.random.default_rng(0)
    clean = replay_answers(model, qx, counts, bound="probs", clip_norm=1.0, noise_std=0.0, rng=rng)
    np.testing.assert_allclose(clean, probs_of(model, qx), atol=1e-5)
    votes = replay_answers(model, qx, counts, bound="votes", clip_norm=1.0, noise_std=0.0, rng=rng)
    np.testing.assert_array_equal(votes.argmax(1), clean.argmax(1))
    assert set(np.unique(votes)) <= {0.0, 1.0}
    noisy = replay_answers(model, qx, counts, bound="probs", clip_norm=1.0, noise_std=plan.noise_std, rng=rng)
    assert (noisy >= 0).all() and np.allclose(noisy.sum(1), 1.0, atol=1e-5)
    assert np.abs(noisy - clean).mean() > 0.05
