"""The site's ClientApp launcher: a site runs only the client code it pinned.

Flower's SuperNode installs the app bundle (FAB) that `flwr run` submitted and runs
*its* ``client.app`` (``flwr-clientapp``, started by ``flower-superexec``). So whoever
can submit a run, the coordinator included, would choose the code that reads the
site's data. fedlora replaces both pieces at the site, with Flower's own parts:

* ``fedlora-superexec`` is Flower's ``flower-superexec`` that takes ClientApp tasks
  only (no agent, model or connector task, which would run bundled code) and starts
  ``fedlora-clientapp`` for each instead of ``flwr-clientapp``;
* ``fedlora-clientapp`` pulls the task's inputs over the SuperNode's Runtime API like
  ``flwr-clientapp`` does, then checks the bundle's SHA-256 against the site's pinned
  releases (``policy.client_releases``) before anything else. A bundle that is not
  pinned is refused: the refusal names its hash, is entered in the site's signed audit
  log, and goes back to the coordinator as an error reply (the round goes on without
  the site). A pinned one is *still not run*: the launcher runs the site's own
  installed ``client.app`` (this package), never a line from the bundle, which is
  never even unpacked.

Flower's ``--trusted-entities`` cannot do this in a private federation: it accepts only
bundles carrying a ``valid_license`` verification, which only Flower Hub issues.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import PolicyError
from common.protocol import CLIENT_CODE_REFUSED, SITE_MISCONFIGURED

if TYPE_CHECKING:
    from flwr.app import Context, Message

logger = logging.getLogger(__name__)

LAUNCHER = "fedlora-clientapp"
SITE_CONFIG_KEY = "site-config"


class UnpinnedCodeError(PolicyError):
    """The run's app bundle is not one of the releases this site pinned."""


def check_bundle(content: bytes, declared: str, run_hash: str, pinned: Sequence[str]) -> str:
    """The bundle's SHA-256 when it is one this site pinned; UnpinnedCodeError otherwise.

    The hash is computed from the bytes received, not taken from what the run says of
    itself, and must also be the one the run and the bundle declare."""
    actual = hashlib.sha256(content).hexdigest()
    if actual != declared or actual != run_hash:
        raise UnpinnedCodeError(
            f"the app bundle's SHA-256 is {actual}, but the run declares {run_hash[:64]!r}: refused"
        )
    if actual not in pinned:
        listed = ", ".join(hash_[:12] for hash_ in pinned) or "none"
        raise UnpinnedCodeError(
            f"the run's app bundle (SHA-256 {actual}) is not a release this site pinned "
            f"(policy.client_releases: {listed}); the site runs only code it reviewed"
        )
    return actual


def installed_client_app() -> Any:
    """The site's own ClientApp: ``client.app`` from this installed package, checked to
    come from here (nothing of a bundle is on ``sys.path``: none is ever unpacked)."""
    from client import app as module

    here = Path(__file__).resolve().parent
    if Path(module.__file__ or "").resolve().parent != here:
        raise PolicyError(f"client.app was not loaded from the installed package ({here})")
    return module.app


def handle_task(message: Message, context: Context, run: Any, fab: Any) -> Message:
    """The reply to one task: the installed ClientApp's, or an error reply naming why
    the site refused (``run`` and ``fab``: Flower's Run and Fab of the task). Flower is
    imported on use, so that importing this module (the CLI, tests) stays light."""
    from flwr.app import Error, Message

    from client.audit import SiteAudit
    from client.releases import record_pins
    from common.config import load_site_config

    config_path = context.node_config.get(SITE_CONFIG_KEY)
    if not isinstance(config_path, str) or not config_path:
        reason = "the SuperNode was started without node config site-config"
        return Message(Error(code=SITE_MISCONFIGURED, reason=reason), reply_to=message)
    config = load_site_config(Path(config_path))
    audit = SiteAudit(config)
    record_pins(audit, config.policy.client_releases)
    try:
        digest = check_bundle(
            getattr(fab, "content", b""),
            str(getattr(fab, "hash_str", "")),
            str(getattr(run, "fab_hash", "")),
            config.policy.client_releases,
        )
    except UnpinnedCodeError as exc:
        bundle = hashlib.sha256(getattr(fab, "content", b"")).hexdigest()
        audit.record("code-refused", run=str(getattr(run, "run_id", "")), fab_sha256=bundle)
        logger.error("site %s refused a run's client code: %s", config.site.id, exc)
        return Message(Error(code=CLIENT_CODE_REFUSED, reason=str(exc)), reply_to=message)
    logger.info("app bundle %s is a pinned release; running the installed client", digest)
    reply: Message = installed_client_app()(message=message, context=context)
    return reply


def run_task(
    runtime_api_address: str, token: str, insecure: bool, certificates: bytes | None
) -> int:
    """One task, as ``flwr-clientapp`` runs it (Flower's own Runtime API client, task
    heartbeat and reply functions), with the site's decision in place of installing
    and loading the bundle. Returns the process's exit code."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    retry_invoker = make_simple_http_retry_invoker()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=certificates,
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry_invoker,
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    status, details, code = SubStatus.FAILED, "the site's ClientApp failed", 1
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        reply = handle_task(message, context, run, fab)
        if reply.has_error():
            details = reply.error.reason or "refused"
        else:
            status, details, code = SubStatus.COMPLETED, "", 0
    except Exception as exc:
        logger.exception("the site's ClientApp raised an exception")
        # Only the kind of failure leaves the site: its message may hold a path.
        reason = f"the site's ClientApp failed ({type(exc).__name__}); see the site's log"
        details = reason
        if message is not None:
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
            reply = Message(error, reply_to=message)
    finally:
        if reply is not None and context is not None:
            try:
                push_message(client, reply, context)
            except Exception:
                logger.exception("could not push the reply to the SuperNode")
                code = 1
        retry_invoker.max_tries = 1
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return code


def main(argv: list[str] | None = None) -> None:
    """``fedlora-clientapp``: what ``flower-superexec`` starts for a ClientApp task,
    with ``flwr-clientapp``'s arguments (a request to install the bundle's dependencies
    is ignored: nothing of a bundle is installed at a site)."""
    from flwr.common.args import add_args_flwr_app_common, try_obtain_flwr_app_token
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    from common.cli import configure_logging

    parser = argparse.ArgumentParser(prog=LAUNCHER, description=main.__doc__)
    parser.add_argument("--runtime-api-address", required=True)
    add_args_flwr_app_common(parser=parser)
    arguments = parser.parse_args(argv)
    configure_logging(False)
    logging.getLogger("client").setLevel(logging.INFO)
    if arguments.parent_pid is not None:
        start_parent_process_monitor(arguments.parent_pid)
    code = run_task(
        arguments.runtime_api_address,
        try_obtain_flwr_app_token(arguments),
        arguments.insecure,
        validate_and_resolve_root_certificates(arguments.root_certificates, arguments.insecure),
    )
    sys.exit(code)


def superexec_main() -> None:
    """``fedlora-superexec``: the site's long-lived ClientApp service. Flower's
    ``flower-superexec``, taking ClientApp tasks only, running each in this process
    through :func:`run_task` (client/service_executor.py), so the site's data and base
    model are loaded once per daemon, not once per message. ``fedlora-clientapp``
    stays the command for a task run on its own (the per-task process Flower knows)."""
    from client.service_executor import InProcessExecutor
    from common.cli import configure_logging
    from common.superexec import run_flower_superexec

    launcher = Path(sys.executable).parent / LAUNCHER
    found = str(launcher) if launcher.exists() else shutil.which(LAUNCHER)
    if found is None:
        raise SystemExit(f"{LAUNCHER} is not installed beside {sys.executable}")
    configure_logging(False)
    logging.getLogger("client").setLevel(logging.INFO)
    run_flower_superexec("CLIENT_APP", found, executor=InProcessExecutor(run_task))
