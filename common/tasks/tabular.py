"""tabular-classification: an FT-Transformer built from transformers modules.

Each feature becomes a token (numeric: a learned vector scaled by the value plus a bias;
categorical: an embedding), a [CLS] token is prepended, and ViT encoder layers (whose
attention projections are ``q_proj``/``v_proj``, the LoRA targets) mix them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.vit.modeling_vit import ViTLayer

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
        super().__init__(**kwargs)


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
) -> FTTransformerConfig:
    return FTTransformerConfig(
        num_numeric_features=num_numeric_features,
        categorical_cardinalities=categorical_cardinalities,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
        num_labels=num_labels,
    )


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
    head_modules=("classifier",),
    demo_config=demo_ft_transformer_config,
    example_inputs=_example_row,
)
