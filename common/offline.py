"""Nothing phones home: the switches that keep the libraries fedlora runs on from
reporting to their makers.

A site trusts its own machine and nobody else, so no process of fedlora's may talk to
anyone but the federation. Flower posts telemetry events and asks a Flower web API
whether an update exists; onnxruntime records and uploads usage events (1DS) and keeps
a device id under ``~/.cache/Microsoft/DeveloperTools/.onnxruntime``; Ray collects
usage statistics; the Hugging Face hub sends telemetry with each request and reaches
the hub at all unless told it is offline (fedlora loads every model from a local
folder, so it never needs the hub).

Most of these libraries read their switch once, when they are imported or initialised,
so the environment must be set before that: importing any fedlora module runs
:func:`force_offline_environment` (``common/__init__.py``), and every Flower process
fedlora starts gets the same variables in its environment
(``common.processes.flower_environment``), because Flower's own commands import flwr
before any fedlora code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

OFFLINE_ENVIRONMENT: Final[Mapping[str, str]] = MappingProxyType(
    {
        # flwr/supercore/telemetry.py reads it at import time; events are posted to
        # telemetry.flower.ai only while it is "1" (the default).
        "FLWR_TELEMETRY_ENABLED": "0",
        # flwr/supercore/update_check.py: flower-superlink, flower-supernode,
        # flower-superexec and the flwr CLI ask Flower's web API for a newer release
        # unless it is exactly "1".
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # libonnxruntime reads it (truthy: 1/true/yes/on/y) when the library starts,
        # i.e. on `import onnxruntime`; without it that import already writes a device
        # id and queues an event under ~/.cache/Microsoft/DeveloperTools/.onnxruntime.
        "ORT_DISABLE_TELEMETRY": "1",
        # ray/_common/usage/usage_lib.py: "0" disables usage stats (Flower's
        # simulation engine runs on Ray); any value but "0" or "1" is an error there.
        "RAY_USAGE_STATS_ENABLED": "0",
        # huggingface_hub/constants.py, read at import time (transformers goes
        # through it): no request to the hub at all, and no telemetry either way.
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        # flwr/supercore/constant.py: the Flower web API behind the update check and
        # Flower Hub (a run started from a Hub app name fetches its bundle there):
        # pointed at the discard port of this machine, so nothing can reach it.
        "FLWR_SUPERGRID_API_URL": "http://127.0.0.1:9/v1",
        # The common convention (https://donottrack.sh); huggingface_hub honours it,
        # and it covers tools that know no switch of their own.
        "DO_NOT_TRACK": "1",
    }
)
"""Every variable fedlora forces, with the value that turns the reporting off."""


def force_offline_environment() -> None:
    """Set every variable of :data:`OFFLINE_ENVIRONMENT` in ``os.environ``.

    Forced, not ``setdefault``: a value the operator's shell or unit file happens to
    carry (``FLWR_TELEMETRY_ENABLED=1``, say) is overwritten, so telemetry cannot be
    switched on by accident through fedlora. Changing what runs offline means changing
    this module, in review.
    """
    os.environ.update(OFFLINE_ENVIRONMENT)


def quiet_onnxruntime() -> None:
    """Make sure onnxruntime reports nothing, before a session is created or a model
    quantized: the environment first (it only helps if onnxruntime is not loaded yet,
    which is why it is imported here and not at the top of this module: importing this
    module must not load the library before the switch is set), then the library's own
    API switch for the events of this process's sessions."""
    force_offline_environment()
    import onnxruntime

    onnxruntime.disable_telemetry_events()
