"""The model architectures a run may name (``teacher.model``, ``distill.server-student``,
``fleet.students``).

The names live apart from their classes (:mod:`feddistill.models`) so that reading a config
imports no torch: every ClientApp process of a deployed SuperNode parses the run config, and
the messages that train nothing (identify, SecAgg+'s key and unmasking stages) start faster
without it.
"""

from __future__ import annotations

MODEL_NAMES = ("mlp", "cnn", "cnn-large")
