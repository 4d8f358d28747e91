"""What a client answers on the round's public queries: debiased, bounded, maybe abstaining.

A client trained on its own label-skewed data over-predicts the classes it holds. Two
options (``distill.*``) make its answers carry what it actually knows:

- **Prior correction** (``prior-correction``): logit adjustment (Menon, Jayasumana, Rawat,
  Jain, Veit & Kumar, "Long-tail learning via logit adjustment", ICLR 2021). The client
  subtracts the log of its own label prior (add-one smoothed counts of its private labels)
  from its logits, turning p(y | x) under its skewed prior into a balanced-prior score. The
  prior is computed on the device and never uploaded.
- **Abstention** (``abstain-confidence``, ``abstain-min-records``; Selective-FD's client
  selector, Shao, Wu & Zhang 2024): the client says nothing on a row where its top
  (corrected) probability is below the confidence threshold, or where it holds fewer than
  ``abstain-min-records`` private records of the class it would name.

An abstention travels as an all-zero row (probabilities), or the vote :data:`ABSTAIN_VOTE`
(one-byte votes). Privacy: a zero row has L2 norm 0, inside the bound every answer row
obeys, so the sensitivity of a client's reply, the Gaussian mechanisms and their accounting
are unchanged; with local DP the noise covers the zero row like any other. Without DP the
server learns where a client abstained, which reveals about its label counts what its
answers already do. Under record-level DP only the confidence rule is allowed: it reads the
DP-trained model alone, whereas the prior and the record counts read the private labels,
which DP-SGD does not protect (``feddistill.config`` refuses the combination).
"""

from __future__ import annotations

import numpy as np

from feddistill.config import RunConfig
from feddistill.protocol import ABSTAIN_VOTE

__all__ = ["ABSTAIN_VOTE", "abstentions", "answer_logits", "label_counts"]


def label_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The client's private records per class."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def answer_logits(logits: np.ndarray, counts: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """The logits the client bounds and sends: prior-corrected when ``distill.prior-correction``."""
    logits = np.asarray(logits, dtype=np.float64)
    if not cfg.distill.prior_correction:
        return logits
    prior = (counts + 1.0) / (counts + 1.0).sum()
    return logits - np.log(prior)[None, :]


def abstentions(logits: np.ndarray, counts: np.ndarray, cfg: RunConfig) -> np.ndarray | None:
    """Rows (bool, ``(Q,)``) the client abstains on, from the logits it sends; None when it
    never abstains (``abstain-confidence`` = 0 and ``abstain-min-records`` = 0)."""
    d = cfg.distill
    if d.abstain_confidence <= 0 and d.abstain_min_records <= 0:
        return None
    probs = _softmax(np.asarray(logits, dtype=np.float64))
    predicted = probs.argmax(axis=1)
    unsure = probs.max(axis=1) < d.abstain_confidence
    unheld = counts[predicted] < d.abstain_min_records
    return unsure | unheld
