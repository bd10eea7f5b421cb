"""tabular-classification: an FT-Transformer built from transformers modules.

Each feature becomes a token (numeric: a learned vector scaled by the value plus a bias;
categorical: an embedding), a [CLS] token is prepended, and ViT encoder layers (whose
attention projections are ``q_proj``/``v_proj``, the LoRA targets) mix them.

Beside the encoder, a base built by ``fedlora model init`` has a *linear path*
(``linear_head``: one weight per numeric feature and per category, per class, zero at
first) whose logits are added to the encoder's, as in Wide & Deep (Cheng et al. 2016).
There is no public tabular pretext to pretrain the encoder on, and a frozen random
encoder carries little of a real table; the linear path, trained in full with the head,
is what lets a site of a few hundred people learn under DP (a DP logistic regression is
the baseline to beat), while LoRA on attention can add interactions on top.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.vit.modeling_vit import ViTLayer

from common.data_config import BOUND_RULE, is_public_bound
from common.errors import ConfigError
from common.tasks.base import TaskSpec


class FTTransformerConfig(PretrainedConfig):
    model_type = "fedlora_ft_transformer"

    def __init__(
        self,
        num_numeric_features: int = 0,
        categorical_cardinalities: list[int] | None = None,
        hidden_size: int = 64,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        intermediate_size: int = 128,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        layer_norm_eps: float = 1e-12,
        qkv_bias: bool = True,
        initializer_range: float = 0.02,
        linear_path: bool = False,
        numeric_bounds: list[list[float]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.num_numeric_features = num_numeric_features
        self.categorical_cardinalities = list(categorical_cardinalities or [])
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.qkv_bias = qkv_bias
        self.initializer_range = initializer_range
        self.linear_path = linear_path
        """A linear path from the features to the logits (False: a base saved before it)."""
        self.numeric_bounds = [list(map(float, pair)) for pair in numeric_bounds or []]
        """The federation's public [low, high] per numeric feature, in feature order
        (empty: none declared). Every site scales its values with these, never with its
        own statistics; they travel with the base model, whose hash every run names."""
        super().__init__(**kwargs)


class FeatureLinear(nn.Module):
    """Logits linear in the features: a weight per numeric feature and class, and a
    per-class value per category (an embedding of width ``classes``)."""

    def __init__(self, numeric: int, cardinalities: list[int], classes: int) -> None:
        super().__init__()
        self.numeric = nn.Linear(numeric, classes) if numeric else None
        self.categorical = nn.ModuleList(
            nn.Embedding(cardinality + 1, classes) for cardinality in cardinalities
        )

    def forward(self, numeric_values: torch.Tensor, categorical_ids: torch.Tensor) -> torch.Tensor:
        parts = [] if self.numeric is None else [self.numeric(numeric_values)]
        parts.extend(
            embedding(categorical_ids[:, index]) for index, embedding in enumerate(self.categorical)
        )
        return torch.stack(parts).sum(0)


class FTTransformerForClassification(PreTrainedModel):
    config_class = FTTransformerConfig
    config: FTTransformerConfig
    base_model_prefix = "ft_transformer"
    main_input_name = "numeric_values"
    _supports_sdpa = True

    def __init__(self, config: FTTransformerConfig) -> None:
        super().__init__(config)
        width = config.hidden_size
        cardinalities = config.categorical_cardinalities
        self.numeric_weight = nn.Parameter(torch.empty(config.num_numeric_features, width))
        self.numeric_bias = nn.Parameter(torch.empty(config.num_numeric_features, width))
        # One table per categorical feature; each feature's index 0 is "other". An id
        # past a feature's own values is an IndexError, never another feature's row.
        self.categorical_embeddings = nn.ModuleList(
            nn.Embedding(cardinality + 1, width) for cardinality in cardinalities
        )
        self.cls_token = nn.Parameter(torch.empty(1, 1, width))
        self.layers = nn.ModuleList(ViTLayer(config) for _ in range(config.num_hidden_layers))  # type: ignore[arg-type]
        self.layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(width, int(config.num_labels or 2))
        self.linear_head = (
            FeatureLinear(config.num_numeric_features, cardinalities, int(config.num_labels or 2))
            if config.linear_path
            else None
        )
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, FTTransformerForClassification):
            # Feature tokens at unit scale, so a standardised value moves its token as much
            # as a category changes its embedding.
            nn.init.normal_(module.numeric_weight, std=1.0)
            nn.init.normal_(module.numeric_bias, std=1.0)
            nn.init.trunc_normal_(module.cls_token, std=self.config.initializer_range)
        if isinstance(module, (nn.Linear, nn.Embedding)) and module in self._linear_parts():
            # Zero at first: the path starts out predicting nothing, like a new head.
            for parameter in module.parameters():
                nn.init.zeros_(parameter)

    def _linear_parts(self) -> list[nn.Module]:
        head = getattr(self, "linear_head", None)
        return [] if head is None else list(head.modules())

    def forward(
        self,
        numeric_values: torch.Tensor,
        categorical_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        tokens = [numeric_values.unsqueeze(-1) * self.numeric_weight + self.numeric_bias]
        tokens.extend(
            embedding(categorical_ids[:, index]).unsqueeze(1)
            for index, embedding in enumerate(self.categorical_embeddings)
        )
        cls = self.cls_token.expand(numeric_values.shape[0], -1, -1)
        hidden = torch.cat([cls, *tokens], dim=1)
        for layer in self.layers:
            hidden = layer(hidden)
        logits = self.classifier(self.layernorm(hidden[:, 0]))
        if self.linear_head is not None:
            logits = logits + self.linear_head(numeric_values, categorical_ids)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def demo_ft_transformer_config(
    *,
    num_numeric_features: int,
    categorical_cardinalities: list[int],
    num_labels: int = 2,
    hidden_size: int = 32,
    layers: int = 2,
    numeric_bounds: list[list[float]] | None = None,
) -> FTTransformerConfig:
    return FTTransformerConfig(
        linear_path=True,
        numeric_bounds=numeric_bounds,
        num_numeric_features=num_numeric_features,
        categorical_cardinalities=categorical_cardinalities,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
        num_labels=num_labels,
    )


def public_bounds(directory: Path) -> list[list[float]]:
    """The public numeric bounds a tabular base model declares (config.json), read
    without its weights; empty when it declares none."""
    config_file = directory / "config.json"
    try:
        declared = json.loads(config_file.read_text()).get("numeric_bounds") or []
        bounds = [[float(low), float(high)] for low, high in declared]
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"numeric_bounds in the base model's config.json cannot be read: {exc}"
        ) from None
    if not all(is_public_bound(low, high) for low, high in bounds):
        raise ConfigError(f"each numeric_bounds pair in the base model's config.json {BOUND_RULE}")
    return bounds


def _example_row(config: FTTransformerConfig) -> dict[str, torch.Tensor]:
    return {
        "numeric_values": torch.zeros(1, config.num_numeric_features),
        "categorical_ids": torch.zeros(1, len(config.categorical_cardinalities), dtype=torch.long),
    }


TABULAR_TASK = TaskSpec(
    name="tabular-classification",
    data_kind="table",
    model_class=FTTransformerForClassification,
    input_names=("numeric_values", "categorical_ids"),
    default_lora_targets=("q_proj", "v_proj"),
    head_modules=("classifier", "linear_head"),
    demo_config=demo_ft_transformer_config,
    example_inputs=_example_row,
)
