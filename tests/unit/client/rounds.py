"""What a coordinator would send a site for a test round: the request and the initial
global adapter, built the way server/run.py builds them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Context, Message, RecordDict
from peft import get_peft_model_state_dict

from client.site import Site
from common.adapters import arrays_to_record
from common.config import FederationConfig, LoraSettings
from common.protocol import RoundRequest
from common.tasks import model_fingerprint


def round_request(site: Site, server_round: int = 1, **overrides: object) -> RoundRequest:
    federation = FederationConfig(
        task=site.task.name,
        base_model=site.config.site.base_model,
        rounds=3,
        batch_size=16,
        lora=LoraSettings(r=4),
        **overrides,  # type: ignore[arg-type]
    )
    return RoundRequest.for_round(
        federation,
        model_fingerprint(site.config.site.base_model),
        server_round,
        site.task.lora_targets(site.task.load_base_model(site.config.site.base_model).config),
    )


def site_message(site: Site, request: RoundRequest, kind: str) -> Message:
    """The coordinator's instruction to ``site``: the request and the initial adapter."""
    content = RecordDict(
        {
            "arrays": arrays_to_record(initial_adapter(site, request)),
            "config": request.to_record(),
        }
    )
    return Message(content, dst_node_id=1, message_type=kind)


def node_context(config_path: Path) -> Context:
    """A SuperNode's context whose node config names ``config_path``."""
    return Context(
        run_id=1,
        node_id=1,
        node_config={"site-config": str(config_path)},
        state=RecordDict(),
        run_config={},
    )


def initial_adapter(site: Site, request: RoundRequest) -> dict[str, np.ndarray]:
    model = site.task.wrap_with_lora(
        site.task.load_base_model(site.config.site.base_model), request.lora
    )
    return {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}
