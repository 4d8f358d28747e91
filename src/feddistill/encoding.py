"""How answers travel: float32, float16, or uint8-quantized probabilities.

uint8 maps a probability p in [0, 1] to round(255 p): 4x smaller than float32 with an
error of at most 1/510 per entry (Sattler et al. 2020, "Communication-Efficient
Federated Distillation", quantize the soft labels). Only for bounded, noise-free
answers (probabilities or votes); the config refuses it with local noise.
"""

from __future__ import annotations

import numpy as np

ANSWER_DTYPES = ("float32", "float16", "uint8")


def encode_answers(answers: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return np.rint(np.clip(answers, 0.0, 1.0) * 255).astype(np.uint8)
    return np.ascontiguousarray(answers.astype(dtype))


def decode_answers(answers: np.ndarray) -> np.ndarray:
    if answers.dtype == np.uint8:
        return answers.astype(np.float32) / 255.0
    return answers.astype(np.float32)
