"""The site side: the ClientApp, the site daemon and the artifact commands.

``common`` first: Flower and onnxruntime read their telemetry switches when they are
imported, and a process whose first fedlora import is a ``client`` module (a
ClientApp loaded by name) must already have them off (``common/offline.py``).
"""

import common  # noqa: F401
