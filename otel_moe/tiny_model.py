"""Build small random-weight MoE checkpoints that vLLM loads on a CPU.

Nothing is fetched from a model hub: the config comes from transformers'
classes, the weights are random (seeded), and the tokenizer is a byte-level
BPE trained here on a built-in corpus. head_dim is 64 because vLLM's CPU
attention kernel refuses smaller heads.
"""
from __future__ import annotations

import json
import os
from typing import Callable

VOCAB_SIZE = 512
EOS = "<|endoftext|>"

_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    initializer_range=0.2,  # large enough that routing is visibly skewed, not uniform noise
)


def _qwen2_moe(layers: int):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_COMMON, num_hidden_layers=layers, intermediate_size=256, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False,
    )


def _qwen3_moe(layers: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_COMMON, head_dim=64, num_hidden_layers=layers, intermediate_size=256,
        moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
    )


def _mixtral(layers: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        **_COMMON, num_hidden_layers=layers, intermediate_size=64,
        num_local_experts=8, num_experts_per_tok=2,
    )


def _olmoe(layers: int):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        **_COMMON, num_hidden_layers=layers, intermediate_size=64,
        num_experts=8, num_experts_per_tok=2,
    )


ARCHITECTURES: dict[str, Callable] = {
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
}


def _corpus() -> list[str]:
    words = (
        "the expert router sends every token to a few experts and the model learns which "
        "expert knows what a mixture of experts is fast because most experts rest while "
        "others work telemetry shows the routing layer by layer step by step request by "
        "request prefill decode latency histogram heatmap imbalance load balance"
    ).split()
    lines = []
    for i in range(400):
        lines.append(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)))
        lines.append(f"{i} + {i * 3 % 17} = {i + i * 3 % 17}. Hello, world! {i:04x}")
    return lines


def build_tokenizer(out_dir: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.save_pretrained(out_dir)


def build(out_dir: str, arch: str = "qwen2_moe", layers: int = 4, seed: int = 0) -> str:
    """Write a checkpoint (config, safetensors weights, tokenizer) into ``out_dir``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer(out_dir)
    config = ARCHITECTURES[arch](layers)
    from transformers import AutoTokenizer

    eos_id = AutoTokenizer.from_pretrained(out_dir).eos_token_id
    config.bos_token_id = config.eos_token_id = config.pad_token_id = eos_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "otel_moe_tiny.json"), "w") as f:
        json.dump({"arch": arch, "layers": layers, "seed": seed}, f)
    return out_dir
