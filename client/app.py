"""The Flower ClientApp: turns messages into calls on :class:`client.site.Site`.

Which site a SuperNode is comes from its node config (``site-config = "path.toml"``),
so one ClientApp serves every institution. Simulations pass their own resolver. The
app keeps one Site per site for the life of its process (client/service.py), so a
message does not re-read the site's data or base model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.artifacts import check_artifact, install_artifact
from client.service import process_site_cache
from client.site import Site
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
from common.replies import (
    ArtifactCheckMetrics,
    EvalMetrics,
    InstallMetrics,
    ReplyMetrics,
    TrainMetrics,
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
    metrics: ReplyMetrics,
    adapter: ArrayRecord | None = None,
    details: dict[str, str] | None = None,
) -> Message:
    identity: dict[str, int | str] = {SITE_ID_KEY: site.site_id, **(details or {})}
    content = RecordDict({"metrics": metrics.to_record()})
    if adapter is not None:
        content["arrays"] = adapter
        head = site.audit.head()  # the 'training-done' entry this update is logged in
        if head is not None:
            identity[AUDIT_HEAD_SEQ], identity[AUDIT_HEAD_HASH] = head
    content["site"] = ConfigRecord(cast(dict[str, Any], identity))
    return Message(content, reply_to=message)


def _unpack(message: Message, site: Site) -> tuple[RoundRequest, AdapterArrays]:
    """The round request and global adapter the message carries."""
    config = message.content.config_records.get("config")
    arrays = message.content.array_records.get("arrays")
    if config is None or arrays is None:
        raise UpdateError("the message lacks its 'config' or 'arrays' record")
    return RoundRequest.from_record(config), record_to_arrays(arrays)


def _artifact(message: Message) -> dict[str, object] | None:
    """The artifact's files as sent; the site validates them (client.artifacts)."""
    record = message.content.config_records.get(ARTIFACT_RECORD)
    return None if record is None else dict(record)


def _run(request: RoundRequest, message: Message) -> str:
    """The run a round belongs to: the federation's (kept across a resume), else Flower's."""
    return request.run_id or str(message.metadata.run_id)


Handler = Callable[[Message, Site], Message]


def train_reply(message: Message, site: Site) -> Message:
    """One round of DP training. The site's privacy ledger is on disk before
    ``site.train`` returns, so before the update is handed to Flower."""
    request, adapter = _unpack(message, site)
    outcome = site.train(request, adapter, run=_run(request, message))
    metrics = TrainMetrics(
        num_examples=outcome.result.examples,
        epsilon=outcome.epsilon,
        epsilon_budget=site.config.privacy.epsilon,
        delta=site.config.privacy.delta,
        noise_multiplier=outcome.noise_multiplier,
        steps=outcome.result.steps,
    )
    return _reply(message, site, metrics, arrays_to_record(outcome.adapter))


def evaluate_reply(message: Message, site: Site) -> Message:
    request, adapter = _unpack(message, site)
    result = site.evaluate(request, adapter, run=_run(request, message))
    metrics = EvalMetrics(
        num_examples=result.examples, eval_loss=result.loss, eval_accuracy=result.accuracy
    )
    return _reply(message, site, metrics)


def artifact_check_reply(message: Message, site: Site) -> Message:
    """Verify the signed artifact and score fp32 and int8 on held-out data; the reply
    names the accountant behind the ε this site reported, for the manifest."""
    with site.lock:
        check = check_artifact(site, _artifact(message), run=str(message.metadata.run_id))
    metrics = ArtifactCheckMetrics.model_validate(check.metrics())
    details: dict[str, str] = {"accountant": site.config.privacy.accountant}
    return _reply(message, site, metrics, details=details)


def artifact_install_reply(message: Message, site: Site) -> Message:
    """Verify the checked artifact and install it as the site's model."""
    with site.lock:
        install_artifact(site, _artifact(message), run=str(message.metadata.run_id))
    return _reply(message, site, InstallMetrics(installed=1))


def introduction_reply(message: Message, site: Site) -> Message:
    """Who this node is: the public site name, the task it serves and the fingerprint
    of its audit key. This is where the site joins the run; it reads no data."""
    site.joined(str(message.metadata.run_id))
    identity: dict[str, Any] = {
        SITE_ID_KEY: site.site_id,
        "task": site.task.name,
        "kind": site.config.site.kind,
        AUDIT_KEY: site.audit.key_fingerprint,
    }
    return Message(
        RecordDict({"site": ConfigRecord(cast(dict[str, Any], identity))}), reply_to=message
    )


def build_client_app(
    resolve_site: SiteResolver = site_config_from_node_config, mods: list[Mod] | None = None
) -> ClientApp:
    """The ClientApp; ``mods`` wrap every handler (Flower mods, e.g. fault injection)."""
    app = ClientApp(mods=mods)
    sites = process_site_cache()

    def handled(handler: Handler) -> Callable[[Message, Context], Message]:
        def handle(message: Message, context: Context) -> Message:
            try:
                return handler(message, sites.get(resolve_site(context)))
            except Exception as exc:
                return _error_reply(message, exc)

        return handle

    app.train()(handled(train_reply))
    app.evaluate()(handled(evaluate_reply))
    app.evaluate("artifact_check")(handled(artifact_check_reply))
    app.query("artifact_install")(handled(artifact_install_reply))
    app.query()(handled(introduction_reply))
    return app


app = build_client_app()
