"""Privacy: bounded + noised replies, accountants, the privacy ledger, DP-SGD.

``feddistill.privacy.audit`` (membership-inference audits) is a separate subpackage.
Names are imported lazily (PEP 562): a device's ClientApp process, started afresh for
every message, pays for Opacus and dp-accounting only when it uses them.
"""

from importlib import import_module
from typing import Any

_WHERE = {
    "ACCOUNTANTS": "accounting",
    "VALUE_DISCRETIZATION_INTERVAL": "accounting",
    "GaussianEvent": "accounting",
    "check_neighbouring": "accounting",
    "epsilon": "accounting",
    "epsilon_pld": "accounting",
    "epsilon_prv": "accounting",
    "epsilon_rdp": "accounting",
    "epsilon_rdp_opacus": "accounting",
    "gnmax_events": "accounting",
    "gnmax_rdp_epsilon": "accounting",
    "noise_multiplier_for_epsilon": "accounting",
    "DPTrainResult": "dpsgd",
    "dp_train": "dpsgd",
    "dpsgd_schedule": "plan",
    "noise_for_record_target": "dpsgd",
    "UNITS": "ledger",
    "BudgetExceeded": "ledger",
    "LedgerEntry": "ledger",
    "LedgerFileError": "ledger",
    "PrivacyLedger": "ledger",
    "BOUNDS": "mechanisms",
    "NEIGHBOURING": "mechanisms",
    "add_gaussian_noise": "mechanisms",
    "bound_answers": "mechanisms",
    "confident_gnmax": "mechanisms",
    "gnmax": "mechanisms",
    "noise_rng": "mechanisms",
    "noisy_histogram": "mechanisms",
    "reply_sensitivity": "mechanisms",
    "row_norm_bound": "mechanisms",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
