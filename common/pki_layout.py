"""The fixed names and modes of the federation's certs folder (``certs/`` by default).

One place for them, because the coordinator, the site daemon and the ``fedlora pki``
commands all read the same files: a name changed in one spot only would break a
deployment silently (:mod:`common.pki` draws the whole layout).
"""

from __future__ import annotations

from common.files import PRIVATE_FILE_MODE

PRIVATE_KEY_MODE = PRIVATE_FILE_MODE
CERTS_MODE = 0o700

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SUPERLINK_CERT = "superlink.pem"
SUPERLINK_KEY = "superlink.key"
COORDINATOR_KEY = "coordinator.key"
COORDINATOR_PUB = "coordinator.pub"
SITES = "sites"
BUNDLES = "bundles"
NODE_KEY = "node.key"
NODE_PUB = "node.pub"
AUDIT_KEY = "audit-key.pem"
AUDIT_PUB = "audit.pub"
CONNECTION = "connection.toml"
README = "README.txt"
