"""The Flower ClientApp: turns messages into calls on :class:`client.site.Site`.

Which site a SuperNode is comes from its node config (``site-config = "path.toml"``),
so one ClientApp serves every institution. Simulations pass their own resolver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.artifacts import check_artifact, install_artifact
from client.site import Site, load_site
from common.adapters import AdapterArrays, arrays_to_record, record_to_arrays
from common.errors import (
    ArtifactError,
    AuditError,
    ConfigError,
    DataError,
    FedloraError,
    PolicyError,
    SigningError,
    UpdateError,
)
from common.protocol import (
    ARTIFACT_RECORD,
    ARTIFACT_REFUSED,
    AUDIT_HEAD_HASH,
    AUDIT_HEAD_SEQ,
    AUDIT_KEY,
    BAD_GLOBAL_ADAPTER,
    REFUSED_BY_POLICY,
    SITE_FAILED,
    SITE_ID_KEY,
    SITE_MISCONFIGURED,
    RoundRequest,
)

logger = logging.getLogger(__name__)

SiteResolver = Callable[[Context], Path]


def site_config_from_node_config(context: Context) -> Path:
    value = context.node_config.get("site-config")
    if not value:
        raise ConfigError("this SuperNode's node config lacks 'site-config' (path to site TOML)")
    return Path(str(value))


def _error_reply(message: Message, exc: Exception) -> Message:
    """Refusals and bad payloads are explained to the server; local problems are not.

    A configuration, data, key or audit-log error can name local paths, so only its
    kind leaves the site; any other failure (a bug, an I/O error) leaves as a generic
    error. The operator sees the full message in the site's own log.
    """
    if not isinstance(exc, FedloraError):
        logger.exception("site failed to handle a %s message", message.metadata.message_type)
        code, reason = SITE_FAILED, "the site failed (see the site's log)"
        return Message(Error(code=code, reason=reason), reply_to=message)
    logger.warning("%s", exc)
    if isinstance(exc, PolicyError):
        code, reason = REFUSED_BY_POLICY, str(exc)
    elif isinstance(exc, ArtifactError):
        code, reason = ARTIFACT_REFUSED, f"{exc.kind}: {exc}"
    elif isinstance(exc, ConfigError | DataError | SigningError | AuditError):
        kind = (
            "configuration"
            if isinstance(exc, ConfigError)
            else "data"
            if isinstance(exc, DataError)
            else "audit trail"
        )
        code, reason = SITE_MISCONFIGURED, f"the site's {kind} is unusable (see the site's log)"
    else:
        code, reason = BAD_GLOBAL_ADAPTER, str(exc)
    return Message(Error(code=code, reason=reason), reply_to=message)


def _reply(
    message: Message,
    site: Site,
    metrics: dict[str, int | float],
    adapter: ArrayRecord | None = None,
    details: dict[str, str] | None = None,
) -> Message:
    identity: dict[str, int | str] = {SITE_ID_KEY: site.site_id, **(details or {})}
    content = RecordDict({"metrics": MetricRecord(cast(dict[str, Any], metrics))})
    if adapter is not None:
        content["arrays"] = adapter
        head = site.audit.head()  # the 'training-done' entry this update is logged in
        if head is not None:
            identity[AUDIT_HEAD_SEQ], identity[AUDIT_HEAD_HASH] = head
    content["site"] = ConfigRecord(cast(dict[str, Any], identity))
    return Message(content, reply_to=message)


def _unpack(
    message: Message, context: Context, resolve_site: SiteResolver
) -> tuple[Site, RoundRequest, AdapterArrays]:
    """This node's site, and the round request and global adapter the message carries."""
    site = load_site(resolve_site(context))
    config = message.content.config_records.get("config")
    arrays = message.content.array_records.get("arrays")
    if config is None or arrays is None:
        raise UpdateError("the message lacks its 'config' or 'arrays' record")
    return site, RoundRequest.from_record(config), record_to_arrays(arrays)


def _artifact(message: Message) -> dict[str, object] | None:
    """The artifact's files as sent; the site validates them (client.artifacts)."""
    record = message.content.config_records.get(ARTIFACT_RECORD)
    return None if record is None else dict(record)


def _run(request: RoundRequest, message: Message) -> str:
    """The run a round belongs to: the federation's (kept across a resume), else Flower's."""
    return request.run_id or str(message.metadata.run_id)


def build_client_app(
    resolve_site: SiteResolver = site_config_from_node_config, mods: list[Mod] | None = None
) -> ClientApp:
    """The ClientApp; ``mods`` wrap every handler (Flower mods, e.g. fault injection)."""
    app = ClientApp(mods=mods)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        try:
            site, request, adapter = _unpack(message, context, resolve_site)
            # The site's privacy ledger is on disk before train() returns, so before the
            # update is handed to Flower.
            outcome = site.train(request, adapter, run=_run(request, message))
        except Exception as exc:
            return _error_reply(message, exc)
        metrics: dict[str, float | int] = {
            "num-examples": outcome.result.examples,
            "epsilon": outcome.epsilon,
            "epsilon-budget": site.config.privacy.epsilon,
            "delta": site.config.privacy.delta,
            "noise-multiplier": outcome.noise_multiplier,
            "steps": outcome.result.steps,
        }
        return _reply(message, site, metrics, arrays_to_record(outcome.adapter))

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        try:
            site, request, adapter = _unpack(message, context, resolve_site)
            result = site.evaluate(request, adapter, run=_run(request, message))
        except Exception as exc:
            return _error_reply(message, exc)
        metrics: dict[str, float | int] = {
            "num-examples": result.examples,
            "eval-loss": result.loss,
            "eval-accuracy": result.accuracy,
        }
        return _reply(message, site, metrics)

    @app.evaluate("artifact_check")
    def artifact_check(message: Message, context: Context) -> Message:
        """Verify the signed artifact and score fp32 and int8 on held-out data."""
        try:
            site = load_site(resolve_site(context))
            check = check_artifact(site, _artifact(message), run=str(message.metadata.run_id))
        except Exception as exc:
            return _error_reply(message, exc)
        # The accountant behind the ε this site reported, for the manifest.
        return _reply(
            message, site, check.metrics(), details={"accountant": site.config.privacy.accountant}
        )

    @app.query("artifact_install")
    def artifact_install(message: Message, context: Context) -> Message:
        """Verify the checked artifact and install it as the site's model."""
        try:
            site = load_site(resolve_site(context))
            install_artifact(site, _artifact(message), run=str(message.metadata.run_id))
        except Exception as exc:
            return _error_reply(message, exc)
        return _reply(message, site, {"installed": 1})

    @app.query()
    def introduce(message: Message, context: Context) -> Message:
        """Who this node is: the public site name, the task it serves and the fingerprint
        of its audit key. The coordinator asks once per run, so this is where the site
        joins the run."""
        try:
            site = load_site(resolve_site(context))
            site.joined(str(message.metadata.run_id))
        except Exception as exc:
            return _error_reply(message, exc)
        return Message(
            RecordDict(
                {
                    "site": ConfigRecord(
                        {
                            SITE_ID_KEY: site.site_id,
                            "task": site.task.name,
                            "kind": site.config.site.kind,
                            AUDIT_KEY: site.audit.key_fingerprint,
                        }
                    )
                }
            ),
            reply_to=message,
        )

    return app


app = build_client_app()
