"""The project's error for a bad run configuration, at the bottom of the layers.

:class:`ConfigError` is defined here, below :mod:`feddistill.config` (which re-exports it:
``from feddistill.config import ConfigError`` is how the rest of the code names it), so that the
arithmetic the config validation runs (:mod:`feddistill.secagg_shares`) can raise it without
importing the config.
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or impossible."""
