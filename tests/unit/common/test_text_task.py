"""The text task on tiny DeepSeek-V3, Qwen2 and Llama models: loading from a directory
with its tokenizer, LoRA where each architecture wants it, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig

from common.config import LoraSettings
from common.errors import ConfigError
from common.tasks import TASKS
from common.tasks.text import ARCHITECTURES, TEXT_TASK, build_word_tokenizer, load_tokenizer

WORDS = [f"w{i}" for i in range(40)]
EXPECTED_TARGETS = {
    "deepseek_v3": {"q_proj", "kv_b_proj"},
    "qwen2": {"q_proj", "v_proj"},
    "llama": {"q_proj", "v_proj"},
}


def save_tiny(directory: Path, architecture: str, *, causal: bool = False) -> Path:
    """A tiny model of ``architecture`` and its tokenizer, saved like a checkpoint."""
    tokenizer = build_word_tokenizer(WORDS)
    config = TEXT_TASK.demo_config(
        architecture=architecture, vocab_size=len(tokenizer), hidden_size=32, layers=2
    )
    torch.manual_seed(0)
    if causal:
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    else:
        TEXT_TASK.new_model(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_the_text_task_is_registered() -> None:
    assert TASKS.get("text-classification") is TEXT_TASK
    assert TEXT_TASK.data_kind == "text"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_architecture_loads_and_gets_lora_on_its_attention(tmp_path, architecture) -> None:
    model = TEXT_TASK.load_base_model(save_tiny(tmp_path, architecture))
    assert model.config.model_type == architecture
    assert set(TEXT_TASK.lora_targets(model.config)) == EXPECTED_TARGETS[architecture]
    wrapped = TEXT_TASK.wrap_with_lora(model, LoraSettings(r=4))
    trained = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in trained if ".lora_" in name}
    assert adapted == EXPECTED_TARGETS[architecture]
    assert any("score" in name for name in trained)
    assert all(".lora_" in name or "score" in name for name in trained)


def test_a_low_rank_query_is_adapted_on_q_b_proj(tmp_path) -> None:
    """The full DeepSeek-V3 compresses the query too: its projection is q_b_proj."""
    config = TEXT_TASK.demo_config(architecture="deepseek_v3", vocab_size=50, hidden_size=32)
    config.q_lora_rank = 16
    assert TEXT_TASK.lora_targets(config) == ("q_b_proj", "kv_b_proj")


def test_a_causal_lm_checkpoint_loads_with_a_new_head(tmp_path) -> None:
    """A downloaded causal LM: its lm_head is dropped, a score head added, pad id set."""
    model = TEXT_TASK.load_base_model(save_tiny(tmp_path, "qwen2", causal=True))
    assert model.score.weight.shape == (2, 32)
    assert model.config.pad_token_id == 0


def test_a_tokenizer_json_alone_is_enough(tmp_path) -> None:
    directory = save_tiny(tmp_path, "qwen2")
    (directory / "tokenizer_config.json").unlink()
    assert len(load_tokenizer(directory)) > 2


def test_a_tokenizer_without_pad_pads_with_eos(tmp_path) -> None:
    directory = save_tiny(tmp_path, "llama")
    settings = json.loads((directory / "tokenizer_config.json").read_text())
    settings.pop("pad_token")
    settings["eos_token"] = "[UNK]"
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))
    tokenizer = load_tokenizer(directory)
    assert tokenizer.pad_token == "[UNK]" and tokenizer.padding_side == "right"


def test_an_unsupported_architecture_is_refused(tmp_path) -> None:
    tokenizer = build_word_tokenizer(WORDS)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    TEXT_TASK.new_model(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="'mistral' model; the text task supports"):
        TEXT_TASK.load_base_model(tmp_path)


def test_a_directory_without_a_tokenizer_is_refused(tmp_path) -> None:
    directory = save_tiny(tmp_path, "qwen2")
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer_config.json").unlink()
    with pytest.raises(ConfigError, match=r"has no tokenizer: expected one of tokenizer\.json"):
        TEXT_TASK.load_base_model(directory)


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path) -> None:
    directory = save_tiny(tmp_path, "qwen2")
    build_word_tokenizer([*WORDS, *(f"x{i}" for i in range(10))]).save_pretrained(directory)
    with pytest.raises(ConfigError, match="do not belong together"):
        TEXT_TASK.load_base_model(directory)


def test_another_models_weights_are_still_refused(tmp_path) -> None:
    """Only the heads may be missing or extra; a body that does not fit is refused."""
    save_tiny(tmp_path / "llama", "llama")
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "llama" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="does not fit"):
        TEXT_TASK.load_base_model(tmp_path / "llama")
