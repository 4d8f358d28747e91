"""Aggregation of client answers into the next teacher signal (Flower strategies)."""

from feddistill.strategies.base import AnswerStrategy, RoundReplies, normalize_rows, teacher_arrays
from feddistill.strategies.dp import CentralGaussianAnswers
from feddistill.strategies.era import EntropyReducedMean, entropy_reduction
from feddistill.strategies.gnmax import GNMaxVotes
from feddistill.strategies.mean import MeanAnswers
from feddistill.strategies.median import MedianAnswers
from feddistill.strategies.outlier import OutlierFilteredMean
from feddistill.strategies.trimmed_mean import TrimmedMeanAnswers
from feddistill.strategies.validation import REPLY_SCHEMA, ReplyCheck, ValidReply, check_reply, validate_reply

__all__ = [
    "AnswerStrategy",
    "CentralGaussianAnswers",
    "GNMaxVotes",
    "EntropyReducedMean",
    "MeanAnswers",
    "MedianAnswers",
    "OutlierFilteredMean",
    "TrimmedMeanAnswers",
    "REPLY_SCHEMA",
    "ReplyCheck",
    "RoundReplies",
    "ValidReply",
    "check_reply",
    "validate_reply",
    "entropy_reduction",
    "make_strategy",
    "normalize_rows",
    "teacher_arrays",
]


def make_strategy(aggregator: str, *, sampling_rate: float, sampling: str, seed: int, era_temperature: float = 0.1,
                  trim_beta: float = 0.2, keep_fraction: float = 0.7, probabilities: bool = True,
                  abstain: bool = False):
    """Build the configured aggregator (``abstain``: clients may send all-zero rows, mean only)."""
    common = dict(sampling_rate=sampling_rate, sampling=sampling, seed=seed)
    if aggregator == "mean":
        return MeanAnswers(**common, abstain=abstain)
    if aggregator == "era":
        return EntropyReducedMean(**common, temperature=era_temperature)
    if aggregator == "median":
        return MedianAnswers(**common, probabilities=probabilities)
    if aggregator == "trimmed-mean":
        return TrimmedMeanAnswers(**common, beta=trim_beta, probabilities=probabilities)
    if aggregator == "outlier-filtered":
        return OutlierFilteredMean(**common, keep_fraction=keep_fraction, probabilities=probabilities)
    raise ValueError(f"unknown aggregator {aggregator!r} (known: mean, era, median, trimmed-mean, outlier-filtered)")
