"""The coordinator side: the ServerApp, aggregation, checkpoints and the artifact.

``common`` first: Flower and onnxruntime read their telemetry switches when they are
imported, and a process whose first fedlora import is a ``server`` module (a ServerApp
loaded by name) must already have them off (``common/offline.py``).
"""

import common  # noqa: F401
