"""What a node's config says about it: a device or a simulated client, and its id.

Kept apart from the device's data (:mod:`feddistill.client.device`, which needs torch) so that
the ClientApp answers an identify query without importing it.
"""

from __future__ import annotations

from flwr.app import Context

__all__ = ["device_id", "is_device"]


def is_device(context: Context) -> bool:
    """A device reads its data from its own ``data-dir``; a simulated client does not."""
    return bool(context.node_config.get("data-dir"))


def device_id(context: Context) -> int:
    """The node's id in results and state: node config ``partition-id`` (simulation, or a
    device that was given one), otherwise ``device-id``."""
    config = context.node_config
    for key in ("partition-id", "device-id"):
        if key in config:
            try:
                return int(config[key])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"node config '{key}' = {config[key]!r} is not an integer") from exc
    raise ValueError(
        "node config has neither 'partition-id' nor 'device-id': start the SuperNode with "
        '--node-config "device-id=<int> data-dir=\\"/path\\""'
    )
