"""`python -m bench semisup`: where can the student's accuracy come from? (Fashion-MNIST, no DP)

An ablation of the mechanisms of "make the private data count", measured outside the
federated loop on the core fleet (100 clients, Dirichlet α=0.5, seed 0) so that each one's
contribution is seen alone:

1. **public side**: the product's public-only control (KD toward the public teacher's signal
   through the server's own schedule, ``feddistill.server.control``) against a FixMatch
   student (``feddistill.semisup``) trained on the same public data: the teacher's labelled
   sample plus the unlabelled reference set. Public data only: no privacy cost.
2. **fleet labels**: every client trains on its private data alone (cross-entropy, from a
   public start model: the round-0 student or the FixMatch student) and votes on every
   reference row. Per consensus threshold (share of the votes on the top class): how many
   rows the fleet labels, how accurate those labels are, how accurate the public teacher is
   on the same rows, and how often the fleet is right where the teacher is wrong. That last
   count is what the private data can add.
3. **student from fleet labels**: FixMatch again, with the fleet's consensus labels added to
   the labelled set.

Reference-set labels are used only to score. All clients answer every row (the federated
loop would gather those votes over rounds, ~10 clients a round).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np

SHARES = (0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULTS = {"steps": 3000, "fleet_share": 0.7}


def client_votes(fleet, cfg, start, ref_x) -> np.ndarray:
    """(clients, rows) predicted class of every client on every reference row."""
    from bench.ceiling import train_client
    from feddistill.simulations.fleet import private_tensors
    from feddistill.training import predict_logits

    votes = []
    for pid in range(cfg.fleet.num_clients):
        x, y = private_tensors(fleet, pid)
        model = train_client("private-only", start, cfg, x, y, None, None, None, None, seed=cfg.seed * 1_000_003 + pid)
        votes.append(predict_logits(model, ref_x).numpy().argmax(1))
        if (pid + 1) % 25 == 0:
            print(f"semisup: {pid + 1}/{cfg.fleet.num_clients} clients voted", flush=True)
    return np.stack(votes)


def consensus(votes: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(label, share of the votes on it) per row."""
    counts = np.zeros((votes.shape[1], num_classes))
    for row_votes in votes:
        counts[np.arange(votes.shape[1]), row_votes] += 1
    return counts.argmax(1), counts.max(1) / counts.sum(1)


def label_table(label: np.ndarray, share: np.ndarray, teacher_label: np.ndarray, truth: np.ndarray) -> list[dict]:
    rows = []
    for threshold in SHARES:
        kept = share >= threshold
        differ = kept & (label != teacher_label)
        rows.append({
            "share_at_least": threshold,
            "rows": int(kept.sum()),
            "fleet_label_accuracy": float((label[kept] == truth[kept]).mean()) if kept.any() else None,
            "teacher_accuracy_on_them": float((teacher_label[kept] == truth[kept]).mean()) if kept.any() else None,
            "fleet_differs_from_teacher": int(differ.sum()),
            "fleet_right_teacher_wrong": int((differ & (label == truth)).sum()),
            "teacher_right_fleet_wrong": int((differ & (teacher_label == truth)).sum()),
            "labels_with_fleet_accuracy": float((np.where(kept, label, teacher_label) == truth).mean()),
        })
    return rows


def fixmatch_student(cfg, fleet, x, targets, unlabelled, steps: int, test):
    """Test accuracy and model of a FixMatch student on (x, targets) plus `unlabelled`."""
    from feddistill.models import build_model
    from feddistill.semisup import train_fixmatch
    from feddistill.training import evaluate_model

    model = build_model(cfg.distill.server_student, fleet.image_size, fleet.num_classes, seed=cfg.seed)
    train_fixmatch(model, x, targets, unlabelled, steps=steps, flip=True, seed=cfg.seed)
    return evaluate_model(model, *test).accuracy, model


def semisup(out: Path, overrides: dict) -> dict:
    import torch

    from bench.common import header
    from feddistill.config import load_config, validation_size
    from feddistill.models import build_model
    from feddistill.server.app import public_labels, split_validation, teacher_and_validation
    from feddistill.server.control import distil_step, public_control
    from feddistill.simulations.fleet import as_tensors, load_fleet
    from feddistill.training import evaluate_model

    knobs = {**DEFAULTS, **{k: v for k, v in overrides.items() if k in DEFAULTS}}
    config_overrides = {k: v for k, v in overrides.items() if k not in DEFAULTS}
    cfg = load_config(Path("configs/fashion.toml"), {**config_overrides, "output_dir": str(out / "unused")})
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    splits = fleet.splits
    ref_x, ref_y = as_tensors(splits.reference)
    test_x, test_y = as_tensors(splits.test)
    test = (test_x, test_y.numpy())
    truth = ref_y.numpy()
    t0 = time.monotonic()
    teacher, _ = teacher_and_validation(cfg, splits)
    teacher_label = teacher.reference_probs.argmax(1)

    def student():
        return build_model(cfg.distill.server_student, fleet.image_size, fleet.num_classes, seed=cfg.seed)

    public = public_labels(cfg, splits)
    control = public_control(cfg, student, teacher.reference_probs, ref_x, test_x, test[1], cfg.rounds, None, public)
    labelled, _ = split_validation(splits, validation_size(cfg), cfg.seed)  # what the teacher trained on
    lx, ly = as_tensors(labelled.public_labelled)
    one_hot = torch.nn.functional.one_hot(ly, fleet.num_classes).float()
    public_fixmatch, fixmatch_model = fixmatch_student(cfg, fleet, lx, one_hot, ref_x, knobs["steps"], test)
    print(f"semisup: control {control['accuracy']:.4f}, FixMatch {public_fixmatch:.4f}", flush=True)

    round0 = student()
    distil_step(round0, ref_x, teacher.reference_probs, cfg, cfg.seed, public=public)
    starts = {"round-0 student": round0, "FixMatch student": fixmatch_model}
    fleet_labels = {}
    for name, start in starts.items():
        label, share = consensus(client_votes(fleet, cfg, copy.deepcopy(start), ref_x), fleet.num_classes)
        fleet_labels[name] = {"start_test_accuracy": evaluate_model(start, *test).accuracy,
                              "thresholds": label_table(label, share, teacher_label, truth),
                              "_label": label, "_share": share}
    chosen = fleet_labels["FixMatch student"]
    kept = chosen["_share"] >= knobs["fleet_share"]
    x = torch.cat([lx, ref_x[torch.from_numpy(np.flatnonzero(kept))]])
    targets = torch.cat([one_hot, torch.nn.functional.one_hot(torch.from_numpy(chosen["_label"][kept]),
                                                              fleet.num_classes).float()])
    with_fleet, _ = fixmatch_student(cfg, fleet, x, targets, ref_x, knobs["steps"], test)
    for entry in fleet_labels.values():
        entry.pop("_label"), entry.pop("_share")

    summary = {
        **header("semisup", overrides),
        "note": ("no DP; outside the federated loop; every client votes on every reference row; reference labels "
                 "only score. Test accuracy on the 10,000 t10k images."),
        "knobs": knobs,
        "public_teacher_test_accuracy": teacher.test.accuracy,
        "public_teacher_reference_accuracy": float((teacher_label == truth).mean()),
        "public_control_kd": {"test_accuracy": control["accuracy"], "server_epochs": cfg.rounds + 1,
                              "what": control["what"]},
        "public_fixmatch": {"test_accuracy": public_fixmatch, "labelled": len(ly), "unlabelled": len(ref_x),
                            "steps": knobs["steps"]},
        "fleet_labels": fleet_labels,
        "fixmatch_with_fleet_labels": {"test_accuracy": with_fleet, "fleet_rows": int(kept.sum()),
                                       "share_at_least": knobs["fleet_share"], "start": "FixMatch student",
                                       "gain_over_public_fixmatch_points": 100 * (with_fleet - public_fixmatch)},
        "seconds": time.monotonic() - t0,
    }
    plot_semisup(summary, out / "semisup.png")
    (out / "semisup.json").write_text(json.dumps(summary, indent=2))
    return summary


def plot_semisup(summary: dict, path: Path) -> None:
    from bench.common import panel_pair, save_figure as _save

    fig, (left, right) = panel_pair()
    bars = [("public teacher", summary["public_teacher_test_accuracy"]),
            ("public-only control (KD)", summary["public_control_kd"]["test_accuracy"]),
            ("public FixMatch", summary["public_fixmatch"]["test_accuracy"]),
            ("FixMatch + fleet labels", summary["fixmatch_with_fleet_labels"]["test_accuracy"])]
    left.barh([b[0] for b in bars], [100 * b[1] for b in bars], color=["gray", "k", "C0", "C2"])
    for i, (_, v) in enumerate(bars):
        left.text(100 * v + 0.2, i, f"{100 * v:.1f} %", va="center")
    low, high = min(b[1] for b in bars), max(b[1] for b in bars)
    left.set(xlim=(max(0.0, 100 * low - 5), 100 * high + 4), xlabel="test accuracy (%)",
             title="Where the student's accuracy comes from")
    for color, (name, entry) in zip(("C1", "C0"), summary["fleet_labels"].items()):
        rows = entry["thresholds"]
        right.plot([r["rows"] for r in rows], [100 * r["fleet_label_accuracy"] for r in rows], "o-", color=color,
                   label=f"fleet labels (clients start from the {name})")
        right.plot([r["rows"] for r in rows], [100 * r["teacher_accuracy_on_them"] for r in rows], "x:", color=color,
                   label=f"public teacher on the same rows ({name})")
    right.set(xlabel="reference rows the fleet labels (consensus share 0.9 ... 0.5)", ylabel="label accuracy (%)",
              title="Consensus labels vs the public teacher")
    right.legend(fontsize=7)
    _save(fig, path)
