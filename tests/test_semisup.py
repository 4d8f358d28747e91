"""FixMatch on public images (feddistill.semisup) and the semisup bench's consensus bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.semisup import consensus, label_table
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
        stats = train_fixmatch(model, labelled_x, targets, unlabelled, steps=300, batch_size=4, mu=16, threshold=0.9,
                               lr=0.05, flip=True, seed=0)
        accuracy[name] = float((predict_logits(model, test_x).argmax(1) == test_y).float().mean())
        assert (stats.mask_rate > 0) == (name == "fixmatch") and stats.steps == 300
    assert accuracy["fixmatch"] > accuracy["labelled only"] + 0.08, accuracy


def test_fixmatch_refuses_nothing_to_learn_from():
    model = build_model("mlp", 8, 2, seed=0)
    with pytest.raises(ValueError, match="labelled examples"):
        train_fixmatch(model, torch.zeros(0, 1, 8, 8), torch.zeros(0, 2), torch.zeros(5, 1, 8, 8), steps=10)


def test_consensus_and_the_label_table():
    votes = np.array([[0, 1, 2, 2], [0, 1, 1, 2], [0, 2, 0, 2], [1, 1, 0, 2]])  # 4 clients x 4 rows
    label, share = consensus(votes, 3)
    np.testing.assert_array_equal(label, [0, 1, 0, 2])
    np.testing.assert_allclose(share, [0.75, 0.75, 0.5, 1.0])
    truth = np.array([0, 2, 0, 2])
    teacher = np.array([1, 2, 0, 2])
    rows = {r["share_at_least"]: r for r in label_table(label, share, teacher, truth)}
    assert rows[0.7]["rows"] == 3  # rows 0, 1, 3
    assert rows[0.7]["fleet_label_accuracy"] == pytest.approx(2 / 3)
    assert rows[0.7]["fleet_right_teacher_wrong"] == 1 and rows[0.7]["teacher_right_fleet_wrong"] == 1
    assert rows[0.7]["labels_with_fleet_accuracy"] == pytest.approx(0.75)
    assert rows[0.5]["rows"] == 4
