"""`python -m bench ablation`: which mechanism makes the private data count? (Fashion-MNIST, no DP)

Measured outside the federated loop on the core fleet (100 clients, Dirichlet α=0.5, seed 0),
so that each mechanism's contribution is seen alone, with the product's own code for each:

1. **public side** (``feddistill.semisup``): a FixMatch student S0 on the public data (the
   teacher's labelled sample plus the unlabelled reference set);
2. **fleet votes**: every client fine-tunes S0 on its private data alone (cross-entropy) and
   votes on every reference row; variants of what it sends, cumulatively:
   plain votes; + prior correction; + abstention on classes it holds fewer than
   ``min_records`` records of (``feddistill.client.answers``);
3. **consensus gate** (``feddistill.server.consensus``): only rows whose vote share clears the
   threshold calibrated on the held-out public labels to ``precision``;
4. **student**: S0 continued for ``student_steps`` FixMatch steps with the fleet's labels added
   to its labelled set, against the **control**: S0 continued for as many steps with the
   public labels alone. Student minus control is the private gain.

Reference-set labels only score; the test set only scores students. The in-loop numbers with
DP are ``python -m bench headline``'s.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np

DEFAULTS = {
    "steps": 4000,
    "student_steps": 2000,
    "client_lr": 0.01,
    "client_epochs": 5,
    "min_records": 50,
    "precision": 0.9,
}
VARIANTS = ("plain votes", "+ prior correction", "+ abstention", "+ consensus gate")


def _fixmatch(model, x, targets, unlabelled, steps: int, seed: int, flip: bool) -> None:
    from feddistill.semisup import train_fixmatch

    train_fixmatch(model, x, targets, unlabelled, steps=steps, flip=flip, seed=seed)


def client_logits(fleet, num_clients: int, start, ref_x, knobs: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(clients, rows, classes) logits of every client fine-tuned from ``start``, and their label counts."""
    from feddistill.client.answers import label_counts
    from feddistill.data.fleet import private_tensors
    from feddistill.training import predict_logits, train_supervised

    logits, counts = [], []
    for pid in range(num_clients):
        x, y = private_tensors(fleet, pid)
        model = copy.deepcopy(start)
        train_supervised(
            model,
            x,
            y,
            epochs=int(knobs["client_epochs"]),
            batch_size=32,
            lr=float(knobs["client_lr"]),
            seed=seed * 1_000_003 + pid,
        )
        logits.append(predict_logits(model, ref_x).numpy())
        counts.append(label_counts(y.numpy(), fleet.num_classes))
        if (pid + 1) % 25 == 0:
            print(f"ablation: {pid + 1} clients voted", flush=True)
    return np.stack(logits), np.stack(counts)


def vote_variants(logits: np.ndarray, counts: np.ndarray, knobs: dict) -> dict[str, np.ndarray]:
    """Per variant, the (rows, classes) vote counts of the fleet, with the product's answer code."""
    from feddistill.client.answers import abstentions, answer_logits
    from feddistill.config import load_config

    settings = {
        "plain votes": {},
        "+ prior correction": {"distill.prior_correction": True},
        "+ abstention": {"distill.prior_correction": True, "distill.abstain_min_records": knobs["min_records"]},
    }
    out = {}
    for name, overrides in settings.items():
        cfg = load_config(None, {"output_dir": "/tmp/unused", **overrides})
        votes = np.zeros(logits.shape[1:])
        for k in range(len(logits)):
            z = answer_logits(logits[k], counts[k], cfg)
            answer = np.ones(len(z), dtype=bool)
            skip = abstentions(z, counts[k], cfg)
            if skip is not None:
                answer = ~skip
            votes[np.flatnonzero(answer), z.argmax(1)[answer]] += 1
        out[name] = votes
    return out


def label_rows(votes: np.ndarray, accepted: np.ndarray, start_label: np.ndarray, truth: np.ndarray) -> dict:
    label = votes.argmax(1)
    differ = accepted & (label != start_label)
    return {
        "rows": int(accepted.sum()),
        "label_accuracy": float((label[accepted] == truth[accepted]).mean()) if accepted.any() else None,
        "start_student_accuracy_on_them": float((start_label[accepted] == truth[accepted]).mean())
        if accepted.any()
        else None,
        "fleet_right_start_wrong": int((differ & (label == truth)).sum()),
        "start_right_fleet_wrong": int((differ & (start_label == truth)).sum()),
    }


def ablation(out: Path, overrides: dict) -> dict:
    import torch

    from bench.common import header
    from feddistill.config import load_config, validation_size
    from feddistill.data.datasets import FLIP_KEEPS_CLASS
    from feddistill.data.fleet import as_tensors, load_fleet
    from feddistill.models import build_model
    from feddistill.server.app import public_labels, split_validation, validation_labels
    from feddistill.server.consensus import FleetLabels
    from feddistill.training import evaluate_model, predict_logits

    knobs = {**DEFAULTS, **{k: v for k, v in overrides.items() if k in DEFAULTS}}
    cfg = load_config(
        Path("configs/fashion.toml"),
        {**{k: v for k, v in overrides.items() if k not in DEFAULTS}, "output_dir": str(out / "unused")},
    )
    t0 = time.monotonic()
    fleet = load_fleet(cfg.data, cfg.fleet, cfg.seed)
    splits = fleet.splits
    ref_x, ref_y = as_tensors(splits.reference)
    test_x, test_y = as_tensors(splits.test)
    truth, flip = ref_y.numpy(), FLIP_KEEPS_CLASS[cfg.data.dataset]
    labelled, _ = split_validation(splits, validation_size(cfg), cfg.seed)
    lx, ly = as_tensors(labelled.public_labelled)
    one_hot = torch.nn.functional.one_hot(ly, fleet.num_classes).float()
    held = validation_labels(cfg, splits)
    known = np.isin(np.arange(len(truth)), np.concatenate([held.rows, public_labels(cfg, splits).rows]))

    def test_accuracy(model) -> float:
        return evaluate_model(model, test_x, test_y.numpy()).accuracy

    start = build_model(cfg.distill.server_student, fleet.image_size, fleet.num_classes, seed=cfg.seed)
    _fixmatch(start, lx, one_hot, ref_x, int(knobs["steps"]), cfg.seed, flip)
    start_label = predict_logits(start, ref_x).numpy().argmax(1)
    print(f"ablation: public FixMatch student {test_accuracy(start):.4f}", flush=True)

    def continued(rows: np.ndarray, labels: np.ndarray) -> float:
        model = copy.deepcopy(start)
        x = torch.cat([lx, ref_x[torch.from_numpy(rows)]])
        targets = torch.cat([one_hot, torch.nn.functional.one_hot(torch.from_numpy(labels), fleet.num_classes).float()])
        _fixmatch(model, x, targets, ref_x, int(knobs["student_steps"]), cfg.seed + 1, flip)
        return test_accuracy(model)

    control = continued(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    logits, counts = client_logits(fleet, cfg.fleet.num_clients, start, ref_x, knobs, cfg.seed)
    variants = vote_variants(logits, counts, knobs)
    gate = FleetLabels(len(truth), fleet.num_classes, mode="consensus", precision=float(knobs["precision"]))
    abstaining = variants["+ abstention"]
    answered = abstaining.sum(1) > 0
    gate.add(np.flatnonzero(answered), abstaining[answered] / abstaining[answered].sum(1, keepdims=True))
    gated = gate.accepted(held.rows, held.labels)
    gated[held.rows] = False
    accepted = {**{name: votes.sum(1) > 0 for name, votes in variants.items()}, "+ consensus gate": gated}
    variants["+ consensus gate"] = abstaining
    table = []
    for name in VARIANTS:
        rows = np.flatnonzero(accepted[name] & ~known)  # public labels win; validation rows judge
        entry = {"variant": name, **label_rows(variants[name], accepted[name], start_label, truth)}
        entry["student_test_accuracy"] = continued(rows, variants[name].argmax(1)[rows])
        entry["private_gain_points"] = 100 * (entry["student_test_accuracy"] - control)
        print(f"ablation: {name}: {entry}", flush=True)
        table.append(entry)
    summary = {
        **header("ablation", overrides),
        "note": (
            "no DP; outside the federated loop; 100 clients each vote on every reference row; reference labels "
            "only score; test accuracy on the 10,000 t10k images"
        ),
        "knobs": knobs,
        "public_fixmatch_student": {
            "test_accuracy": test_accuracy(start),
            "steps": int(knobs["steps"]),
            "reference_accuracy": float((start_label == truth).mean()),
        },
        "control": {
            "test_accuracy": control,
            "what": "the FixMatch student continued with the public labels alone",
            "steps": int(knobs["student_steps"]),
        },
        "consensus_threshold": gate.threshold,
        "variants": table,
        "seconds": time.monotonic() - t0,
    }
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    return summary
