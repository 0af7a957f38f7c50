"""Small Llama-architecture checkpoints made locally: random ones for tests and benchmarks, with a byte tokenizer."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
# Plain-text turns, so that chat works on any byte-level model (the demo model too): "User: ...\nAssistant:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per byte of UTF-8 plus pad/bos/eos, so any text round-trips; with a chat
    template."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def tiny_llama_config(
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 256 + len(SPECIAL_TOKENS),
    **overrides,
) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 2 * hidden_size + hidden_size // 2,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **overrides,
    )


def save_random_checkpoint(
    path: str | Path, config: LlamaConfig, seed: int = 0, max_shard_size: str | None = None, dtype=torch.float32
) -> Path:
    """Random weights (with a larger init than HF's so the tiny model's outputs are not nearly uniform)."""
    path = Path(path)
    torch.manual_seed(seed)
    config.initializer_range = 0.2
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size or "10GB")
    byte_tokenizer().save_pretrained(path)
    return path
