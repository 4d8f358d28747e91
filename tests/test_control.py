"""The public-only control (same server pipeline, no fleet answers) and the gains measured against it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feddistill.config import load_config
from feddistill.models import build_model
from feddistill.server.control import PublicLabels, distil_step, gap_closed, private_gain, public_control, round_seed
from feddistill.training import evaluate_model


@pytest.fixture(params=["kd", "fixmatch"])
def setting(request, tmp_path, one_torch_thread):
    cfg = load_config(
        None,
        {
            "output_dir": str(tmp_path / "run"),
            "distill.server-epochs": 1,
            "rounds": 2,
            "distill.server-training": request.param,
        },
    )
    rng = np.random.default_rng(0)
    ref_x = torch.from_numpy(rng.random((60, 1, 8, 8), dtype=np.float32))
    test_x = torch.from_numpy(rng.random((40, 1, 8, 8), dtype=np.float32))
    test_y = rng.integers(0, 10, 40)
    signal = rng.dirichlet(np.ones(10), size=60).astype(np.float32)

    def build():
        return build_model(cfg.distill.server_student, 8, 10, seed=cfg.seed)

    public = PublicLabels(rows=np.arange(0, 60, 6), labels=rng.integers(0, 10, 10))
    return cfg, build, signal, ref_x, test_x, test_y, public


def test_control_replays_the_runs_distillation_steps_exactly(setting, tmp_path):
    cfg, build, signal, ref_x, test_x, test_y, public = setting
    control = public_control(cfg, build, signal, ref_x, test_x, test_y, rounds=2, cache=None, public=public)
    # the run's server with a fleet that answers nothing: round 0, then one step per round, same seeds
    student = build()
    accuracies = []
    for rnd in range(3):
        distil_step(student, ref_x, signal, cfg, round_seed(cfg, rnd), public=public)
        accuracies.append(evaluate_model(student, test_x, test_y).accuracy)
    assert control["per_round"] == accuracies
    assert control["accuracy"] == accuracies[-1]
    assert private_gain(accuracies[-1], control["accuracy"]) == 0.0


def test_control_is_cached_by_everything_it_depends_on(setting, tmp_path):
    cfg, build, signal, ref_x, test_x, test_y, public = setting
    cache = tmp_path / "cache"
    first = public_control(cfg, build, signal, ref_x, test_x, test_y, rounds=2, cache=cache, public=public)
    again = public_control(cfg, build, signal, ref_x, test_x, test_y, rounds=2, cache=cache, public=public)
    assert not first["cached"] and again["cached"]
    assert {k: v for k, v in again.items() if k != "cached"} == {k: v for k, v in first.items() if k != "cached"}
    other_signal = np.roll(signal, 1, axis=1)
    changed = public_control(cfg, build, other_signal, ref_x, test_x, test_y, rounds=2, cache=cache, public=public)
    longer = public_control(cfg, build, signal, ref_x, test_x, test_y, rounds=3, cache=cache, public=public)
    assert not changed["cached"] and not longer["cached"]
    assert len(longer["per_round"]) == 4


def test_corrupt_cache_is_recomputed(setting, tmp_path):
    cfg, build, signal, ref_x, test_x, test_y, public = setting
    cache = tmp_path / "cache"
    first = public_control(cfg, build, signal, ref_x, test_x, test_y, rounds=1, cache=cache, public=public)
    for path in cache.iterdir():
        path.write_text("{not json")
    again = public_control(cfg, build, signal, ref_x, test_x, test_y, rounds=1, cache=cache, public=public)
    assert not again["cached"] and again["per_round"] == first["per_round"]


def test_gap_closed():
    assert gap_closed(0.85, 0.80, 0.90) == pytest.approx(0.5)
    assert gap_closed(0.78, 0.80, 0.90) == pytest.approx(-0.2)  # the fleet made it worse: said, not hidden
    assert gap_closed(0.85, 0.80, None) is None
    assert gap_closed(0.85, 0.80, 0.80) is None  # pooling adds nothing: no gap to close
    assert private_gain(0.85, 0.80) == pytest.approx(5.0)


@pytest.mark.parametrize("validation_fraction", [0.0, 0.2])
def test_public_labels_are_the_teachers_rows_of_the_reference_set(tmp_path, validation_fraction):
    from feddistill.config import validation_size
    from feddistill.data.fleet import load_fleet
    from feddistill.server.app import public_labels, split_validation

    overrides = {"output_dir": str(tmp_path), "release.validation_fraction": validation_fraction}
    if not validation_fraction:
        overrides.update({"release.gate": False, "release.calibrate": False})
    cfg = load_config(None, overrides)
    splits = load_fleet(cfg.data, cfg.fleet, cfg.seed).splits
    public = public_labels(cfg, splits)
    size = validation_size(cfg) if validation_fraction else 0
    teacher_splits, validation = split_validation(splits, size, cfg.seed)
    assert len(public.rows) == len(teacher_splits.public_labelled) == cfg.data.public_labelled_size - size
    np.testing.assert_array_equal(splits.reference.y[public.rows], public.labels)  # the right rows, true labels
    np.testing.assert_array_equal(splits.reference.x[public.rows], teacher_splits.public_labelled.x)
    held_out = {row.tobytes() for row in validation.x}
    assert not any(splits.reference.x[r].tobytes() in held_out for r in public.rows)  # the gate's rows stay out
