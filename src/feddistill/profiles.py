"""The two install profiles, and what the lean one leaves out.

``pip install feddistill`` (no extras) is the **device** profile: ``[project] dependencies`` in
pyproject.toml, everything a SuperNode's ClientApp needs (device data, state and ledger, DP-SGD,
SecAgg+, signed-download checks). ``pip install feddistill[full]`` adds the extras below: the
simulation engine, the embedded digits data set, FixMatch, plots, audit figures and reports.
Nothing here imports a third-party package, so the CLI can name what is missing in one line.
"""

from __future__ import annotations

import importlib.util

__all__ = ["DEVICE_EXCLUDED", "DEVICE_EXTRAS", "FULL_INSTALL", "installed", "missing", "missing_message"]

#: What the device profile leaves out: top-level import name -> (distribution, the extra of
#: pyproject.toml that installs it; "" for packages nothing of feddistill needs). The device
#: ClientApp must run with every one of them unimportable (tests/test_device_install.py).
DEVICE_EXCLUDED: dict[str, tuple[str, str]] = {
    "ray": ("ray", "simulation"),  # through flwr[simulation]: the simulation engine
    "sklearn": ("scikit-learn", "simulation"),  # the embedded digits data set
    "kornia": ("kornia", "simulation"),  # FixMatch's augmentations (server side)
    "matplotlib": ("matplotlib", "plots"),  # accuracy, calibration and audit ROC figures, reports
    "PIL": ("pillow", "plots"),  # matplotlib's
    "pandas": ("pandas", ""),
    "flwr_datasets": ("flwr-datasets", ""),  # a device's data come from its own data-dir
    "hypothesis": ("hypothesis", "test"),
    "pytest": ("pytest", "test"),
    "mypy": ("mypy", "test"),
}
#: The extras of pyproject.toml a device does not install.
DEVICE_EXTRAS = ("simulation", "plots", "full", "test")
FULL_INSTALL = "pip install 'feddistill[full]'"


def missing(extra: str) -> list[str]:
    """The packages of ``extra`` (:data:`DEVICE_EXCLUDED`'s) that this environment cannot import."""
    names = [name for name, (_, of) in DEVICE_EXCLUDED.items() if of == extra]
    return [DEVICE_EXCLUDED[name][0] for name in names if not installed(name)]


def installed(name: str) -> bool:
    """Whether the top-level package ``name`` is installed: found, and not merely a namespace
    package that a same-named folder (such as Ray's ``/tmp/ray``) makes of the working directory."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a finder that refuses it, a half-removed package
        return False
    return spec is not None and spec.origin is not None


def missing_message(command: str, *extras: str) -> str | None:
    """Why ``command`` cannot run in this environment (a device install), or None when it can."""
    absent = [package for extra in extras for package in missing(extra)]
    if not absent:
        return None
    return (
        f"{command} needs the full install, and this environment lacks {', '.join(absent)} "
        f"(a device install: `pip install feddistill` leaves them out); install them with {FULL_INSTALL}"
    )
