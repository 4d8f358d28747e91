"""Aggregation of client answers into the next teacher signal (Flower strategies).

Names are imported lazily (PEP 562), so that the config can read the aggregator registry
(:mod:`feddistill.strategies.registry`) without loading Flower or any strategy. Every module of
this package that defines an aggregator registers it there (``register_aggregator``);
:func:`make_strategy` builds one by name.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from feddistill.strategies.registry import AGGREGATORS, Aggregator, make_strategy, register_aggregator

_WHERE = {
    "AnswerStrategy": "base",
    "RoundReplies": "base",
    "normalize_rows": "base",
    "probability_answers": "base",
    "teacher_arrays": "base",
    "CentralGaussianAnswers": "dp",
    "EntropyReducedMean": "era",
    "entropy_reduction": "era",
    "GNMaxVotes": "gnmax",
    "MeanAnswers": "mean",
    "MedianAnswers": "median",
    "OutlierFilteredMean": "outlier",
    "TrimmedMeanAnswers": "trimmed_mean",
    "REPLY_SCHEMA": "validation",
    "ReplyCheck": "validation",
    "ValidReply": "validation",
    "check_reply": "validation",
    "validate_reply": "validation",
}

__all__ = sorted([*_WHERE, "AGGREGATORS", "Aggregator", "make_strategy", "register_aggregator"])

if TYPE_CHECKING:  # pragma: no cover
    from .base import AnswerStrategy, RoundReplies, normalize_rows, probability_answers, teacher_arrays
    from .dp import CentralGaussianAnswers
    from .era import EntropyReducedMean, entropy_reduction
    from .gnmax import GNMaxVotes
    from .mean import MeanAnswers
    from .median import MedianAnswers
    from .outlier import OutlierFilteredMean
    from .trimmed_mean import TrimmedMeanAnswers
    from .validation import REPLY_SCHEMA, ReplyCheck, ValidReply, check_reply, validate_reply


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
