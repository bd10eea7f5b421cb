"""What a coordinator would send a site for a test round: the request and the initial
global adapter, built the way server/run.py builds them."""

from __future__ import annotations

import numpy as np
from peft import get_peft_model_state_dict

from client.site import Site
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
        site.task.default_lora_targets,
    )


def initial_adapter(site: Site, request: RoundRequest) -> dict[str, np.ndarray]:
    model = site.task.wrap_with_lora(
        site.task.load_base_model(site.config.site.base_model), request.lora
    )
    return {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}
