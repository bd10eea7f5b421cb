"""Who a node is, by what the coordinator registered rather than what the node says.

In a deployment the coordinator registers each site's node key with the SuperLink under
the site's name (``flwr supernode register KEY --name SITE``), and knows the key that
signs each site's audit log (``certs/sites/SITE/audit.pub``, handed to the run as the
site registry, see ``write_site_registry`` in server/deployment.py). A site name then
belongs to the node key registered under it, and a site's introduction must announce
its registered audit key. A simulation registers no names and hands over no registry:
there, names are first come, first served, as before.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from flwr.app import ConfigRecord, Message
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid

from common.errors import ConfigError
from common.identifiers import is_site_id
from common.protocol import AUDIT_KEY, REFUSAL_CODES
from server.strategy_utils import FailedReply, bind_site, claimed_site, readable_reason

logger = logging.getLogger(__name__)

REGISTRY_AUDIT_KEY = "audit_key"
"""In the site registry file ({site: {"audit_key": fingerprint}}): the fingerprint of the
key that signs the site's audit log (common.signing.fingerprint)."""
FINGERPRINT = re.compile(r"^ed25519:[0-9a-f]{64}$")
SITE_DETAILS = ("kind", "task", AUDIT_KEY)
"""What a site's introduction tells the coordinator (and its audit log) of the site."""
MAX_DETAIL_CHARS = 100


# ------------------------------------------------------------- the site registry ---


def parse_site_registry(document: object) -> dict[str, str]:
    """Site -> registered audit-key fingerprint, from the registry's JSON document."""
    if not isinstance(document, dict):
        raise ConfigError("the site registry must be a JSON object of sites")
    audit_keys: dict[str, str] = {}
    for site, entry in document.items():
        if not is_site_id(site):
            raise ConfigError(f"the site registry names {site!r}, which is not a site id")
        if not isinstance(entry, dict):
            raise ConfigError(f"the site registry's entry for {site} is not an object")
        key = entry.get(REGISTRY_AUDIT_KEY)
        if key is None:
            continue
        if not isinstance(key, str) or not FINGERPRINT.match(key):
            raise ConfigError(
                f"the site registry's audit key for {site} is not an ed25519: fingerprint"
            )
        audit_keys[site] = key
    return audit_keys


def load_site_registry(path: Path) -> dict[str, str]:
    """Site -> audit-key fingerprint, from the file ``write_site_registry`` wrote."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"the site registry {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"the site registry {path} is not readable JSON: {exc}") from None
    return parse_site_registry(document)


# ---------------------------------------------------------------- pure checks ---


def registered_names(nodes: Iterable[NodeInfo]) -> dict[int, str]:
    """Node id -> the name its key is registered under, for the nodes that have one
    (none in a simulation)."""
    return {node.node_id: node.name for node in nodes if node.name}


def audit_key_problem(site: str, announced: object, audit_keys: Mapping[str, str]) -> str | None:
    """Why a site's introduction cannot be accepted given the audit key registered for
    the site, or None (also when none is registered for it)."""
    expected = audit_keys.get(site)
    if expected is None:
        return None
    if announced is None or announced == "":
        return f"site {site} announced no audit key; its registered audit key is {expected}"
    if not isinstance(announced, str) or not FINGERPRINT.match(announced):
        return f"site {site} announced a malformed audit key; its registered one is {expected}"
    if announced != expected:
        return f"site {site} announced audit key {announced}, not its registered {expected}"
    return None


def unverified_nodes(
    nodes: Iterable[int],
    known: Mapping[int, str],
    registered: Mapping[int, str],
    audit_keys: Mapping[str, str],
) -> dict[int, str]:
    """Node -> site, for the nodes whose site has a registered audit key and whose
    introduction has not shown it yet (a node not in ``known`` has not joined): such a
    node takes no round, or it could skip the check by not introducing itself."""
    return {
        node: registered[node]
        for node in nodes
        if node not in known and registered.get(node) in audit_keys
    }


def screen_introductions(
    replies: Iterable[Message],
    known: dict[int, str],
    registered: Mapping[int, str] | None = None,
    audit_keys: Mapping[str, str] | None = None,
) -> tuple[dict[str, dict[str, str]], list[FailedReply]]:
    """The sites that joined (each with what it said of itself: SITE_DETAILS), and the
    nodes rejected for who they claim to be: a name not theirs (``registered``: node ->
    registered name) or an audit key other than their site's (``audit_keys``: site ->
    fingerprint). A joined site's node is bound in ``known``; a rejected one never is.
    Error replies and replies that name no site are neither, and so is, without
    registered names (a simulation), a name another node took first: as ever, that
    node is asked rounds and its replies are rejected with the reason."""
    joined: dict[str, dict[str, str]] = {}
    rejected: list[FailedReply] = []
    for reply in replies:
        if reply.has_error():
            continue
        node = reply.metadata.src_node_id
        site, problem = bind_site(node, claimed_site(reply), known, registered)
        if (problem is None and node not in known) or (problem is not None and not registered):
            continue
        details = reply.content.config_records.get("site") or ConfigRecord()
        if problem is None:
            problem = audit_key_problem(site, details.get(AUDIT_KEY), audit_keys or {})
            if problem is not None:
                del known[node]
        if problem is not None:
            rejected.append(FailedReply(node, site, "rejected", problem))
            continue
        joined[site] = {
            key: str(details[key])[:MAX_DETAIL_CHARS] for key in SITE_DETAILS if key in details
        }
    return joined, rejected


# ------------------------------------------------------------------- admission ---


class Admission:
    """Which nodes may take part in a run: the strategy's record of the names Flower has
    the nodes' keys registered under, the sites' registered audit keys, and the nodes
    rejected for claiming what is not theirs (they take no round of the run)."""

    def __init__(self, audit_keys: Mapping[str, str] | None = None) -> None:
        self.audit_keys = dict(audit_keys or {})
        self.registered: dict[int, str] = {}
        """Node -> its registered name (empty in a simulation)."""
        self.rejected: dict[int, FailedReply] = {}
        self.unanswered: dict[int, tuple[str, str]] = {}
        """Node -> (status, reason) of its last error reply to an introduction."""
        self._listed: set[int] = set()
        self._unreported: list[FailedReply] = []

    def learn(self, grid: Grid, node_ids: Iterable[int]) -> None:
        """Read the registered names again if nodes appeared that they do not list."""
        if set(node_ids) <= self._listed:
            return
        nodes = list(grid.get_nodes())
        self._listed.update(node.node_id for node in nodes)
        self.registered.update(registered_names(nodes))

    def unverified(self, node_ids: Iterable[int], known: Mapping[int, str]) -> dict[int, str]:
        """The nodes (not rejected) whose site's registered audit key is not yet shown."""
        waiting = unverified_nodes(node_ids, known, self.registered, self.audit_keys)
        return {node: site for node, site in waiting.items() if node not in self.rejected}

    def barred(self, node_ids: Iterable[int], known: Mapping[int, str]) -> set[int]:
        """The nodes that may not take this round."""
        nodes = list(node_ids)
        return {node for node in nodes if node in self.rejected} | set(
            self.unverified(nodes, known)
        )

    def to_introduce(
        self, node_ids: Iterable[int], known: Mapping[int, str], asked: set[int]
    ) -> list[int]:
        """The nodes to ask who they are: those never asked, and those still to show
        their registered audit key; never a joined or a rejected one."""
        nodes = list(node_ids)
        unverified = self.unverified(nodes, known)
        return [
            node
            for node in nodes
            if node not in known
            and node not in self.rejected
            and (node not in asked or node in unverified)
        ]

    def screen(
        self, replies: Iterable[Message], known: dict[int, str]
    ) -> dict[str, dict[str, str]]:
        """The sites that joined by these introductions; the rejected nodes are kept, and
        so is why a node answered with an error (a refusal names its reason)."""
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                status = "refused" if reply.error.code in REFUSAL_CODES else "failed"
                self.unanswered[reply.metadata.src_node_id] = (
                    status,
                    readable_reason(reply.error.reason),
                )
        joined, rejected = screen_introductions(replies, known, self.registered, self.audit_keys)
        for failure in rejected:
            logger.warning("node %d is rejected: %s", failure.node_id, failure.reason)
            self.rejected[failure.node_id] = failure
        self._unreported += rejected
        return joined

    def held_back(self, node_ids: Iterable[int], known: Mapping[int, str]) -> list[FailedReply]:
        """To record: the nodes rejected since the last report, and those of ``node_ids``
        whose audit key is not yet shown (each round they are held back)."""
        held, self._unreported = self._unreported, []
        for node, site in self.unverified(node_ids, known).items():
            if node in self.unanswered:  # it said why: a refusal reaches the coordinator
                status, reason = self.unanswered[node]
            else:
                status = "rejected"
                reason = f"site {site} has not shown its registered audit key; it takes no round"
            held.append(FailedReply(node, site, status, reason))
        return held
