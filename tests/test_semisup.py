"""FixMatch on public images (feddistill.semisup) and the ablation bench's vote bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bench.ablation import label_rows, vote_variants

from feddistill.models import build_model
from feddistill.semisup import strong_view, train_fixmatch, weak_view
from feddistill.training import predict_logits


def _toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of noisy 8x8 images: a bright 2x2 patch somewhere in the top half (0) or in
    the bottom half (1). A horizontal flip or a small shift keeps the class; four labelled
    examples do not pin the patch's position down, the unlabelled images do."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.5 * torch.rand(n, 1, 8, 8, generator=g)
    col = torch.randint(0, 7, (n,), generator=g)
    row = torch.randint(0, 3, (n,), generator=g) + 4 * y
    for i in range(n):
        x[i, 0, row[i] : row[i] + 2, col[i] : col[i] + 2] += 0.6
    return x.clamp(0, 1), y


def test_views_keep_shape_and_range_and_differ_from_the_input():
    x, _ = _toy(32, 0)
    torch.manual_seed(0)
    for view in (weak_view(x, flip=True), strong_view(x)):
        assert view.shape == x.shape and view.dtype == x.dtype
        assert float(view.min()) >= 0.0 and float(view.max()) <= 1.0
        assert not torch.equal(view, x)
    # a flip-free weak view only shifts: each image's mass stays (reflect padding moves a little)
    shifted = weak_view(x, flip=False)
    assert torch.allclose(shifted.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=0.2)


def test_fixmatch_learns_from_unlabelled_images(one_torch_thread):
    labelled_x, labelled_y = _toy(4, 1)
    targets = torch.nn.functional.one_hot(labelled_y, 2).float()
    test_x, test_y = _toy(500, 3)
    accuracy = {}
    for name, unlabelled in (("fixmatch", _toy(1000, 2)[0]), ("labelled only", torch.zeros(0, 1, 8, 8))):
        model = build_model("mlp", 8, 2, seed=0)
        stats = train_fixmatch(
            model,
            labelled_x,
            targets,
            unlabelled,
            steps=300,
            batch_size=4,
            mu=16,
            threshold=0.9,
            lr=0.05,
            flip=True,
            seed=0,
        )
        accuracy[name] = float((predict_logits(model, test_x).argmax(1) == test_y).float().mean())
        assert (stats.mask_rate > 0) == (name == "fixmatch") and stats.steps == 300
    assert accuracy["fixmatch"] > accuracy["labelled only"] + 0.08, accuracy


def test_fixmatch_refuses_nothing_to_learn_from():
    model = build_model("mlp", 8, 2, seed=0)
    with pytest.raises(ValueError, match="labelled examples"):
        train_fixmatch(model, torch.zeros(0, 1, 8, 8), torch.zeros(0, 2), torch.zeros(5, 1, 8, 8), steps=10)


def test_the_ablation_counts_votes_with_the_products_answer_rules():
    # 2 clients x 3 rows x 3 classes; client 1 holds no record of class 2
    logits = np.array([[[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]], [[3.0, 0, 0], [0, 0, 3.0], [0, 0, 3.0]]])
    counts = np.array([[60, 60, 60], [60, 60, 0]])
    variants = vote_variants(logits, counts, {"min_records": 50})
    np.testing.assert_array_equal(variants["plain votes"], [[2, 0, 0], [0, 1, 1], [0, 0, 2]])
    # its prior corrected, client 1 (no record of class 2) swings to class 2 on every row, and so
    # abstains on every row: only client 0's votes remain
    np.testing.assert_array_equal(variants["+ prior correction"][:, 2], [1, 1, 2])
    np.testing.assert_array_equal(variants["+ abstention"], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    truth, start = np.array([0, 1, 2]), np.array([0, 2, 2])
    row = label_rows(variants["+ abstention"], np.array([True, True, True]), start, truth)
    assert row["rows"] == 3 and row["label_accuracy"] == 1.0
    assert row["fleet_right_start_wrong"] == 1 and row["start_right_fleet_wrong"] == 0
