"""Deployment helpers: TLS/auth credentials, signed downloads, a local secure deployment.

See :mod:`feddistill.deploy.certs` for the Flower 1.41 deployment facts
(CLI flags, key formats, SuperNode registration procedure).

Submodules are imported lazily so that ``python -m feddistill.deploy.certs``
runs cleanly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CredentialPaths": "certs",
    "DeploymentError": "local",
    "LocalDeployment": "local",
    "deploy_local": "local",
    "generate_credentials": "certs",
    "supernode_public_keys": "certs",
    "KeyLoadError": "signing",
    "ReleaseRejected": "signing",
    "fingerprint": "signing",
    "load_private_key": "signing",
    "load_public_key": "signing",
    "sign_release": "signing",
    "signed_message": "signing",
    "verify_release": "signing",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .certs import CredentialPaths, generate_credentials, supernode_public_keys
    from .local import DeploymentError, LocalDeployment, deploy_local
    from .signing import (
        KeyLoadError,
        ReleaseRejected,
        fingerprint,
        load_private_key,
        load_public_key,
        sign_release,
        signed_message,
        verify_release,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
