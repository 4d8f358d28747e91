"""Privacy: bounded + noised replies, accountants, the privacy ledger, DP-SGD.

``feddistill.privacy.audit`` (membership-inference audits) is a separate subpackage.
"""

from .accounting import (
    ACCOUNTANTS,
    VALUE_DISCRETIZATION_INTERVAL,
    GaussianEvent,
    check_neighbouring,
    epsilon,
    epsilon_pld,
    epsilon_prv,
    epsilon_rdp,
    epsilon_rdp_opacus,
    gnmax_events,
    gnmax_rdp_epsilon,
    noise_multiplier_for_epsilon,
)
from .dpsgd import DPTrainResult, dp_train, dpsgd_schedule, noise_for_record_target
from .ledger import UNITS, BudgetExceeded, LedgerEntry, LedgerFileError, PrivacyLedger
from .mechanisms import (
    BOUNDS,
    NEIGHBOURING,
    add_gaussian_noise,
    bound_answers,
    confident_gnmax,
    gnmax,
    noise_rng,
    noisy_histogram,
    reply_sensitivity,
    row_norm_bound,
)

__all__ = [
    "ACCOUNTANTS",
    "BOUNDS",
    "NEIGHBOURING",
    "UNITS",
    "VALUE_DISCRETIZATION_INTERVAL",
    "BudgetExceeded",
    "DPTrainResult",
    "GaussianEvent",
    "LedgerEntry",
    "LedgerFileError",
    "PrivacyLedger",
    "add_gaussian_noise",
    "bound_answers",
    "check_neighbouring",
    "confident_gnmax",
    "dp_train",
    "dpsgd_schedule",
    "epsilon",
    "epsilon_pld",
    "epsilon_prv",
    "epsilon_rdp",
    "epsilon_rdp_opacus",
    "gnmax",
    "gnmax_events",
    "gnmax_rdp_epsilon",
    "noise_for_record_target",
    "noise_multiplier_for_epsilon",
    "noise_rng",
    "noisy_histogram",
    "reply_sensitivity",
    "row_norm_bound",
]
