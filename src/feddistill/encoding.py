"""How answers travel: float32, float16, uint8-quantized probabilities, or one vote per query.

uint8 maps a probability p in [0, 1] to round(255 p): 4x smaller than float32 with an
error of at most 1/510 per entry (Sattler et al. 2020, "Communication-Efficient
Federated Distillation", quantize the soft labels). ``vote`` sends only the client's
top class per query as one byte (the one-hot votes of PATE and of DS-FL's hard labels):
|Q| bytes instead of 4 |Q| C, decoded to one-hot rows on the server. Both are for
bounded, noise-free answers only; the config refuses them with local noise.
"""

from __future__ import annotations

import numpy as np

from feddistill.protocol import ABSTAIN_VOTE

#: The wire dtypes a client may send answers in (the config's ``distill.answer-dtype`` choices).
ANSWER_DTYPES = ("float32", "float16", "uint8", "vote")


def encode_answers(answers: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.rint(np.clip(answers, 0.0, 1.0) * 255).astype(np.uint8)
    if dtype == "vote":
        if answers.shape[1] > ABSTAIN_VOTE:
            raise ValueError(
                f"vote answers carry a class index in one byte: at most {ABSTAIN_VOTE} classes, got {answers.shape[1]}"
            )
        votes = answers.argmax(axis=1).astype(np.uint8)
        votes[~(answers > 0).any(axis=1)] = ABSTAIN_VOTE  # an all-zero row is an abstention
        return np.ascontiguousarray(votes)
    return np.ascontiguousarray(answers.astype(dtype))


def decode_answers(answers: np.ndarray) -> np.ndarray:
    if answers.dtype == np.uint8:
        return answers.astype(np.float32) / 255.0
    return answers.astype(np.float32)


def decode_votes(votes: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot rows from class indices (validated by the caller to lie in [0, num_classes) or to
    be ``ABSTAIN_VOTE``, which decodes to an all-zero row)."""
    rows = np.zeros((len(votes), num_classes), dtype=np.float32)
    answered = votes != ABSTAIN_VOTE
    rows[np.flatnonzero(answered), votes[answered].astype(np.int64)] = 1.0
    return rows
