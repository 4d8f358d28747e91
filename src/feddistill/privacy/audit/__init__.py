"""Model-agnostic core of the membership-inference audit.

Metrics (ROC, TPR at low FPR, empirical epsilon with Clopper-Pearson bounds),
attack scores (loss, confidence, LiRA, RMIA), the one-run canary audit of
Steinke, Nasr & Jagielski (2023), label-distribution inference and log-log
ROC plots.  Inputs are numpy arrays; nothing here depends on torch or Flower.
"""

from .attacks import (
    confidence_scores,
    lira_offline,
    lira_online,
    logit_scaled_confidence,
    loss_scores,
    rmia_scores,
    true_class_probability,
)
from .label_inference import estimate_label_histogram, kl_divergence, tv_distance
from .metrics import (
    auc,
    clopper_pearson,
    empirical_epsilon,
    empirical_epsilon_bonferroni,
    epsilon_from_rates,
    max_certifiable_epsilon,
    membership_advantage,
    roc,
    slices,
    summarize_attack,
    tpr_at_fpr,
)
from .one_run import (
    audit_canaries,
    default_k_grid,
    guesses_from_scores,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)
from .plots import dp_tradeoff_curve, plot_roc_loglog

__all__ = [
    "audit_canaries",
    "auc",
    "clopper_pearson",
    "confidence_scores",
    "default_k_grid",
    "dp_tradeoff_curve",
    "empirical_epsilon",
    "empirical_epsilon_bonferroni",
    "epsilon_from_rates",
    "estimate_label_histogram",
    "guesses_from_scores",
    "kl_divergence",
    "lira_offline",
    "lira_online",
    "logit_scaled_confidence",
    "loss_scores",
    "max_certifiable_epsilon",
    "membership_advantage",
    "one_run_epsilon_lower_bound",
    "one_run_p_value",
    "plot_roc_loglog",
    "rmia_scores",
    "roc",
    "slices",
    "summarize_attack",
    "tpr_at_fpr",
    "true_class_probability",
    "tv_distance",
]
