"""The otel-moe data model: every span, event and attribute name, and the
encodings of per-token arrays. Sinks encode with it, the report and the tests
decode with it; nothing else spells these names.

Schema version 3 (documented in docs/schema.md; still read: version 2, which wrote a
step's request ids as a string array, and version 1, which also wrote the weights as
float32 without naming their dtype):
  span ``moe.step`` (one per engine step, or per chunk of one when a step is
  too large for one export): timed over the step's model execution.
  event ``moe.routing`` on it, one per logged layer.
  span ``moe.request`` (one per finished, sampled request), ``gen_ai.request.id`` as
  on vLLM's own ``llm_request`` span, in the request's own trace.
"""
from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Optional, Union

import numpy as np
import pybase64

from otel_moe.layer_ranges import format_ranges, parse_ranges

SCHEMA_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
SCHEMA = "otel_moe.schema_version"
INSTRUMENTATION_SCOPE = "otel_moe"
RUN_ID = "otel_moe.run_id"  # resource attribute: one run of vLLM (all its processes)

PREFILL, DECODE = "prefill", "decode"  # a token's phase: position < prompt length, or after

STEP_SPAN = "moe.step"
ROUTING_EVENT = "moe.routing"
REQUEST_SPAN = "moe.request"

# moe.step span
STEP_INDEX = "moe.step.index"  # counts mode: the first step of the window
STEP_LAST_INDEX = "moe.step.last_index"  # counts mode: the last step of the window
STEP_CHUNK = "moe.step.chunk"  # 0-based; a step too large for one export is cut into chunks
STEP_CHUNKS = "moe.step.chunks"
MODE = "moe.mode"  # "tokens" | "counts"
NUM_TOKENS = "moe.step.num_tokens"  # tokens in this span (this chunk)
NUM_REQUESTS = "moe.step.num_requests"
# The ids in batch order (a request may be split over chunks), as one string, "\n" between
# ids (version 3; encode_request_ids): a string array of 256 ids cost the SDK a check and the
# exporter an AnyValue per id. A string array where an id holds a newline, and in versions 1-2.
REQUEST_IDS = "moe.step.request_ids"
# Per-request arrays are bytes ("<u4", one per request id): hundreds of requests per step
# would otherwise cost an attribute check per element in the SDK, on the engine's host.
REQUEST_TOKENS = "moe.step.request_tokens"  # tokens of each request in this span
REQUEST_FIRST_POSITIONS = "moe.step.request_first_positions"  # position of each one's first token
REQUEST_PROMPT_LENS = "moe.step.request_prompt_lens"  # position < prompt_len -> prefill
LAYERS = "moe.layers"  # int[], layers that have a moe.routing event
TOP_K = "moe.top_k"
NUM_EXPERTS = "moe.num_experts"
DP_RANK = "moe.dp_rank"
DROPPED_STEPS = "otel_moe.dropped_steps"  # cumulative, this process, since start
DROPPED_TOKENS = "otel_moe.dropped_tokens"
FAILED_EXPORT_SPANS = "otel_moe.failed_export_spans"
CONTROL_VERSION = "otel_moe.control.version"  # live-control changes applied before this step
ENGINE_THREAD_NS = "otel_moe.engine_thread_ns"  # cumulative: recording's time on vLLM's engine thread before this step
# Tokens of the step whose routing is not in the span: their requests were not sampled
# (OTEL_TRACES_SAMPLER). On a step's first chunk only; absent: none.
STEP_UNSAMPLED_TOKENS = "moe.step.unsampled_tokens"

# moe.routing event
LAYER = "moe.layer"
EXPERT_IDS = "moe.expert_ids"  # bytes: [tokens, top_k] row-major, dtype EXPERT_IDS_DTYPE
EXPERT_IDS_DTYPE = "moe.expert_ids.dtype"  # numpy dtype string: "|u1" or "<u2"
EXPERT_WEIGHTS = "moe.expert_weights"  # bytes: [tokens, top_k] row-major, dtype EXPERT_WEIGHTS_DTYPE
EXPERT_WEIGHTS_DTYPE = "moe.expert_weights.dtype"  # "<f2", as capture keeps them (absent, schema version 1: "<f4")
EXPERT_COUNTS = "moe.expert_counts"  # bytes: [num_experts] "<u4" (counts mode)

# moe.request span
REQUEST_ID = "gen_ai.request.id"
PREFILL_TOKENS = "moe.request.prefill_tokens"
DECODE_TOKENS = "moe.request.decode_tokens"
REQUEST_EXPERT_COUNTS = "moe.request.expert_counts"  # bytes: [L, E], L = moe.layers, E = moe.num_experts
REQUEST_EXPERT_COUNTS_DTYPE = "moe.request.expert_counts.dtype"  # the narrowest of COUNTS_DTYPES for its largest count
COUNTS_DTYPES = ("|u1", "<u2", "<u4")
COUNTS_DTYPE = "<u4"  # a moe.request's counts before version 4 (which named no dtype)
U32 = "<u4"
REQUEST_INCOMPLETE = "moe.request.incomplete"  # true: evicted before vLLM reported it finished
# true: live control paused recording or switched layers/mode while the request ran,
# so its token and expert counts cover only part of it
REQUEST_PARTIAL = "moe.request.partial"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"  # as vLLM's llm_request names the model

WEIGHTS_DTYPE = "<f2"
VERSION_1_WEIGHTS_DTYPE = "<f4"  # what a routing event without EXPERT_WEIGHTS_DTYPE holds
READABLE_WEIGHTS_DTYPES = ("<f2", "<f4")
READABLE_IDS_DTYPES = ("|u1", "<u2")

# Metrics (sinks/metrics.py): the counter the report can also read
METRIC_EXPERT_TOKENS = "moe.expert.tokens"
# otel-moe's own cost: its time on vLLM's engine thread, over the steps it recorded
METRIC_ENGINE_THREAD_TIME = "otel_moe.engine_thread.time"
METRIC_RECORDED_STEPS = "otel_moe.recorded_steps"

# vLLM's own request span (vllm/tracing): latency beside routing
VLLM_REQUEST_SPAN = "llm_request"
VLLM_TTFT = "gen_ai.latency.time_to_first_token"
VLLM_E2E = "gen_ai.latency.e2e"
VLLM_QUEUE = "gen_ai.latency.time_in_queue"
VLLM_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"


# torch.profiler ranges (record_function names) in vLLM's profiler traces.
# Names carry the values because Chrome-trace user annotations have no arguments.
STEP_RANGE = "otel_moe.step"  # around a recorded step's model execution
LAYER_RANGE = "otel_moe.layer"  # around one MoE layer, where its Python runs (not in CUDA-graph replays)
TELEMETRY_RANGE = "otel_moe.telemetry"  # around otel-moe's own work on the engine thread
_STEP_RANGE_PATTERN = re.compile(
    rf"^{re.escape(STEP_RANGE)} (\d+) tokens=(\d+) requests=(\d+) moe_layers=([0-9,-]+) dp=(\d+) run=(\S*)$")
_LAYER_RANGE_PATTERN = re.compile(rf"^{re.escape(LAYER_RANGE)} (\d+)$")


def step_range_name(step: int, tokens: int, requests: int, moe_layers: list[int], dp_rank: int, run_id: str) -> str:
    """``moe_layers``: every MoE layer this worker runs, in forward order (recorded
    or not): what kernels replayed from a CUDA graph are attributed to by order."""
    return (f"{STEP_RANGE} {step} tokens={tokens} requests={requests} "
            f"moe_layers={format_ranges(moe_layers)} dp={dp_rank} run={run_id}")


def parse_step_range(name: str) -> Optional[dict]:
    match = _STEP_RANGE_PATTERN.match(name)
    if match is None:
        return None
    step, tokens, requests, moe_layers, dp_rank, run_id = match.groups()
    return {"step": int(step), "tokens": int(tokens), "requests": int(requests),
            "moe_layers": sorted(parse_ranges(moe_layers) or ()), "dp_rank": int(dp_rank), "run_id": run_id}


def layer_range_name(layer: int) -> str:
    return f"{LAYER_RANGE} {layer}"


def parse_layer_range(name: str) -> Optional[int]:
    match = _LAYER_RANGE_PATTERN.match(name)
    return int(match.group(1)) if match else None


def ids_dtype(num_experts: int) -> np.dtype:
    return np.dtype("|u1") if num_experts <= 256 else np.dtype("<u2")


def decode_ids(data: Union[bytes, str], dtype: str, top_k: int) -> np.ndarray:
    if dtype not in READABLE_IDS_DTYPES:
        raise ValueError(f"expert ids dtype {dtype!r} is not one of {READABLE_IDS_DTYPES}")
    return decode_array(data, dtype, top_k)


def decode_weights(data: Union[bytes, str], dtype: str, top_k: int) -> np.ndarray:
    """-> [tokens, top_k] in the dtype they were sent in (float16 or float32: every float16
    is a float32, so readers widen where they compute, and a step's weights stay half the size)."""
    if dtype not in READABLE_WEIGHTS_DTYPES:
        raise ValueError(f"expert weights dtype {dtype!r} is not one of {READABLE_WEIGHTS_DTYPES}")
    return decode_array(data, dtype, top_k)


def encode_request_ids(ids: list[str]) -> Union[str, list[str]]:
    joined = "\n".join(ids)
    if not ids or joined.count("\n") != len(ids) - 1 or "" in ids:
        return list(ids)  # (none, or an id the joined form could not give back)
    return joined


def decode_request_ids(value: Any) -> list:
    """A step's request ids from either form (readers check that each is a string)."""
    return value.split("\n") if isinstance(value, str) else list(value)


def b64decode(text: str) -> bytes:
    """The bytes of an OTLP/JSON ``bytesValue``, as ``base64.b64decode`` gives them: by
    pybase64's SIMD decoder (~8x faster, most of a report's reading) when the text is
    strict base64, as every OTLP/JSON writer makes it, else by the standard library's."""
    try:
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return base64.b64decode(text)


def encode_u32(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype=U32).tobytes()


def decode_u32(data: Union[bytes, str]) -> np.ndarray:
    if isinstance(data, str):
        data = b64decode(data)
    return np.frombuffer(data, dtype=U32).astype(np.int64)


def encode_counts(counts: np.ndarray) -> tuple[bytes, str]:
    """A moe.request's counts in the narrowest dtype that holds them: a request's counts are
    at most its tokens, so a short one's [58, 256] go in 15 KB of uint8, not 59 KB of uint32."""
    largest = int(counts.max()) if counts.size else 0
    dtype = next(d for d in COUNTS_DTYPES if largest <= np.iinfo(np.dtype(d)).max)
    return np.ascontiguousarray(counts, dtype=dtype).tobytes(), dtype


def decode_counts(attributes: dict) -> np.ndarray:
    """A moe.request's counts -> [L, E] int64, from its attributes (any readable version)."""
    dtype = attributes.get(REQUEST_EXPERT_COUNTS_DTYPE, COUNTS_DTYPE)
    if dtype not in COUNTS_DTYPES:
        raise ValueError(f"request counts dtype {dtype!r} is not one of {COUNTS_DTYPES}")
    return decode_array(attributes[REQUEST_EXPERT_COUNTS], dtype, int(attributes[NUM_EXPERTS])).astype(np.int64)


def decode_array(data: Union[bytes, str], dtype: str, top_k: int) -> np.ndarray:
    """Bytes (or their base64, as OTLP/JSON writes them) -> [tokens, top_k]."""
    if isinstance(data, str):
        data = b64decode(data)
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(-1, top_k)


# ---- reading OTLP/JSON (the collector's files) ---------------------------
def attr_value(value: dict) -> Any:
    """One OTLP/JSON AnyValue -> Python (64-bit ints arrive as strings)."""
    if "stringValue" in value:
        return value["stringValue"]
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "bytesValue" in value:
        return value["bytesValue"]  # base64, decoded lazily by decode_array
    if "arrayValue" in value:
        return [attr_value(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return attributes(value["kvlistValue"].get("values", []))
    return None


def attributes(items: list) -> dict:
    return {kv["key"]: attr_value(kv.get("value", {})) for kv in items or []}
