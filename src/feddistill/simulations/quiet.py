"""Three messages every `feddistill simulate` printed, none of them about the run, dropped by
exact text; every other log record and warning passes.

- Flower's "DEPRECATED FEATURE: The `run_simulation` function is deprecated" banner, once per
  simulation (the run, then the FedAvg peer: twice). `run_simulation` is the in-process engine
  `feddistill simulate` is built on; `flwr run .` (its replacement) is documented separately.
- Flower's "fraction_evaluate is set to 0.0" warning: the FedAvg peer skips federated evaluation
  on purpose (the server evaluates on the test split).
- Ray's FutureWarning "Tip: In future versions of Ray, Ray will no longer override accelerator
  visible devices env var ...", raised by every `ray.init`. Setting the variable it names would
  change how Ray hides GPUs from actors; the filter leaves that behaviour as it is.
"""

from __future__ import annotations

import logging
import re
import warnings

#: The start of each dropped Flower log message (after %-formatting).
FLOWER_NOISE = (
    "DEPRECATED FEATURE: The `run_simulation` function is deprecated",
    "fraction_evaluate is set to 0.0. Federated evaluation will be skipped.",
)
#: The start of Ray's FutureWarning about accelerator env vars.
RAY_ACCELERATOR_TIP = "Tip: In future versions of Ray, Ray will no longer override accelerator visible devices"


class _FlowerNoiseFilter(logging.Filter):
    """Drops exactly the Flower messages in FLOWER_NOISE."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: not ours to judge
            return True
        return not message.startswith(FLOWER_NOISE)


def silence_simulation_noise() -> None:
    """Install both filters (idempotent): on Flower's logger, and in the warnings filters."""
    from flwr.supercore.logger import FLOWER_LOGGER

    if not any(isinstance(f, _FlowerNoiseFilter) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(_FlowerNoiseFilter())
    # filterwarnings replaces an identical filter rather than adding a second one
    warnings.filterwarnings("ignore", message=re.escape(RAY_ACCELERATOR_TIP), category=FutureWarning)
