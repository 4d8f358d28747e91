"""Baselines trained in the same harness on the same fleet: local-only and centralized.

These need the clients' private data pooled in one process, so they exist only
in simulation (a deployed server never sees private data). Each shows its progress
(feddistill.console: a bar on a terminal, a few lines in a log).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from feddistill.config import RunConfig
from feddistill.console import progress, training_progress
from feddistill.data.fleet import Fleet, as_tensors
from feddistill.models import build_model
from feddistill.training import evaluate_model, train_supervised


def local_only(cfg: RunConfig, fleet: Fleet) -> dict[str, Any]:
    """Each client trains its own student on its private data alone; mean test accuracy."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rng = np.random.default_rng(cfg.seed + 7)
    n = len(fleet.parts)
    clients = np.sort(rng.choice(n, size=min(n, cfg.baselines.max_local_clients), replace=False))
    test_x, _ = as_tensors(fleet.splits.test)
    accs = []
    with progress(
        f"baseline local-only ({cfg.baselines.local_epochs} epochs each)", len(clients), unit="clients"
    ) as bar:
        for pid in clients:
            data = fleet.private_data(int(pid))
            model = build_model(
                cfg.student_for(int(pid)), fleet.image_size, fleet.num_classes, seed=cfg.seed + int(pid)
            )
            x, y = as_tensors(data)
            _train_baseline(model, x, y, cfg, seed=cfg.seed + int(pid))
            accs.append(evaluate_model(model, test_x, fleet.splits.test.y).accuracy)
            bar.advance()
    return {
        "accuracy_mean": float(np.mean(accs)),
        "accuracy_std": float(np.std(accs)),
        "accuracy_min": float(np.min(accs)),
        "accuracy_max": float(np.max(accs)),
        "clients_evaluated": clients.tolist(),
    }


def _train_baseline(model, x, y, cfg: RunConfig, *, seed: int) -> None:
    """The baselines' one recipe: cross-entropy for baselines.local-epochs at the clients' schedule."""
    train_supervised(
        model,
        x,
        y,
        epochs=cfg.baselines.local_epochs,
        batch_size=cfg.distill.batch_size,
        lr=cfg.distill.lr,
        momentum=cfg.distill.momentum,
        seed=seed,
    )


def centralized(cfg: RunConfig, fleet: Fleet) -> dict[str, Any]:
    """One student trained on the pooled private data (the non-federated upper reference)."""
    model = build_model(cfg.distill.server_student, fleet.image_size, fleet.num_classes, seed=cfg.seed)
    pool = fleet.splits.private_pool.subset(np.concatenate(fleet.parts))
    x, y = as_tensors(pool)
    with training_progress(
        model,
        f"baseline centralized ({len(x):,} pooled rows)",
        epochs=cfg.baselines.local_epochs,
        rows=len(x),
        batch_size=cfg.distill.batch_size,
    ):
        _train_baseline(model, x, y, cfg, seed=cfg.seed)
    test_x, _ = as_tensors(fleet.splits.test)
    return evaluate_model(model, test_x, fleet.splits.test.y).to_dict()
