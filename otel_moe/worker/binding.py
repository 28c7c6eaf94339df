"""Binding to vLLM's workers: with the front end's (``otel_moe.frontend.binding``), the
only modules that know vLLM's internals.

Wraps on the model runner classes, found by feature detection (vLLM 0.26
to 0.33; Model Runner V1, V2 and the CPU runner):
  - ``load_model``: after the model is built (and before torch.compile traces
    it or CUDA graphs are captured) find the MoE layers, allocate the capture
    buffers and bind every selected router to them.
  - ``execute_model``: before a real step's forward (a scheduler output with
    tokens; never a profile, warm-up, dummy or capture run) tell the recorder
    (counts mode: how many of its rows count), after it hand the step on. The
    recorder gets plain data: a ``ScheduledStep`` read off the scheduler output,
    the batch's row order, and what the exporter must know of request ids.
  - ``_dummy_run`` (and ``execute_model`` of a dummy or warm-up run): tell the
    recorder that the forward's rows do not count.
  - ``shutdown``: flush the recorder while the engine goes down.
And one on the workers: ``compile_or_warm_up_model`` marks the warm-up, whose
made-up requests go through the real execute_model in Model Runner V2. And the
scheduler's ``NewRequestData.from_request``, which carries each new request's trace
context to the recorder.
"""
from __future__ import annotations

import logging
import multiprocessing.util
import os
import re
import time
from typing import Any, Callable, Optional

from otel_moe import schema
from otel_moe.config import NUM_MOE_LAYERS, Config, from_env
from otel_moe.config import RUN_ID as RUN_ID_VARIABLE
from otel_moe.worker import profiler_ranges
from otel_moe.worker.capture import RoutingBuffers
from otel_moe.worker.link import ExporterLink
from otel_moe.worker.recorder import ScheduledStep, StepRecorder
from otel_moe.wrapping import WRAPPED, wrap_methods

logger = logging.getLogger("vllm.otel_moe")

RUNNER_CLASSES = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),  # Model Runner V1
    ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner"),  # Model Runner V2
)
# Workers whose warm-up pushes made-up requests ("_warmup_0_"...) through the
# runner's real execute_model (Model Runner V2 does): those steps are not recorded.
WORKER_CLASSES = (("vllm.v1.worker.gpu_worker", "Worker"),)
# Only on the CPU platform: importing vLLM's CPU worker replaces torch.cuda.Event
# process-wide (vllm/v1/worker/cpu/shm.py), which breaks Inductor on a GPU.
CPU_RUNNER_CLASSES = (("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),)
CPU_WORKER_CLASSES = (("vllm.v1.worker.cpu_worker", "CPUWorker"),)
_WARMING = "_otel_moe_warming"
_TRACE = "_otel_moe_trace"  # on vLLM's NewRequestData: (traceparent, tracestate, arrival ns)
NO_TRACE = ("", "", 0)
_RECORDER = "_otel_moe_recorder"
_LAYER_IN_NAME = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
# vLLM appends "-" + 8 hex chars to every request id it is given, to keep ids unique
# inside the engine (v1/engine/input_processor.py: assign_request_id); the exporter
# takes it off again, so records carry the ids users see.
INTERNAL_ID_SUFFIX = r"-[0-9a-f]{8}$"


def install() -> int:
    """Wrap every runner class this vLLM has; returns how many were wrapped.

    The flags are read again when each model is loaded, so an engine built in
    this process later (a benchmark's second engine, say) follows the
    environment of its own creation.
    """
    runner_methods = (("load_model", _wrap_load_model), ("execute_model", _wrap_execute_model),
                      ("_dummy_run", _wrap_dummy_run), ("shutdown", _wrap_shutdown))
    runners, workers = RUNNER_CLASSES, WORKER_CLASSES
    if _on_cpu():
        runners, workers = runners + CPU_RUNNER_CLASSES, workers + CPU_WORKER_CLASSES
    wrapped = sum(wrap_methods(m, c, runner_methods) for m, c in runners)
    for module_name, class_name in workers:
        wrap_methods(module_name, class_name, (("compile_or_warm_up_model", _wrap_warm_up),))
    _wrap_new_request_data()
    if wrapped == 0:
        logger.warning("otel-moe: no vLLM model runner found; routing will not be recorded")
    return wrapped


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:
        return False


def _wrap_new_request_data() -> bool:
    """The scheduler tells the workers of a new request with a ``NewRequestData``, which
    has no field for its trace context: the engine core's ``Request`` has one (what
    the front end handed it). Copied on as one attribute, it reaches the recorder in
    this process or, pickled with the scheduler's output, in a worker process."""
    try:
        from vllm.v1.core.sched.output import NewRequestData
    except Exception as err:
        logger.debug("otel-moe: no NewRequestData in this vLLM: %s", err)
        return False
    original = NewRequestData.__dict__.get("from_request")
    if not isinstance(original, classmethod) or getattr(original.__func__, WRAPPED, False):
        return False
    build = original.__func__

    def from_request(cls, request, *args, **kwargs):
        data = build(cls, request, *args, **kwargs)
        try:
            headers = getattr(request, "trace_headers", None) or {}
            setattr(data, _TRACE, (headers.get("traceparent", ""), headers.get("tracestate", ""),
                                   int(request.arrival_time * 1e9)))
        except Exception:  # telemetry never fails a step: the request goes without its context
            pass
        return data

    from_request.__wrapped__ = build
    setattr(from_request, WRAPPED, True)
    NewRequestData.from_request = classmethod(from_request)
    return True


def _wrap_warm_up(original: Callable) -> Callable:
    def compile_or_warm_up_model(self, *args, **kwargs):
        runner = getattr(self, "model_runner", None)
        setattr(runner, _WARMING, True)
        try:
            return original(self, *args, **kwargs)
        finally:
            setattr(runner, _WARMING, False)

    return compile_or_warm_up_model


def _wrap_load_model(original: Callable) -> Callable:
    def load_model(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if getattr(self, _RECORDER, None) is None:
            config = from_env()
            setattr(self, _RECORDER, (config and attach(self, config)) or False)
        return result

    return load_model


def _wrap_execute_model(original: Callable) -> Callable:
    def execute_model(self, scheduler_output, *args, **kwargs):
        recorder = getattr(self, _RECORDER, None)
        if not recorder:
            return original(self, scheduler_output, *args, **kwargs)
        if kwargs.get("dummy_run") or scheduler_output is None or getattr(self, _WARMING, False):
            _telemetry(recorder, recorder.before_other_forward)
            return original(self, scheduler_output, *args, **kwargs)
        began = _telemetry(recorder, _begin_step, recorder, scheduler_output)
        if began is None or began[1] is None:  # no tokens, or recording is off
            return original(self, scheduler_output, *args, **kwargs)
        scheduled, step = began
        start_ns = time.time_ns()
        with profiler_ranges.step_range(step, scheduled.tokens, len(scheduled.scheduled), recorder.model_moe_layers,
                                        recorder.dp_rank, recorder.run_id):
            result = original(self, scheduler_output, *args, **kwargs)
        end_ns = time.time_ns()
        order = None if recorder.counts_only else batch_order(self)  # counts need no row order
        _telemetry(recorder, recorder.on_step, scheduled, order, start_ns, end_ns)
        return result

    return execute_model


def _begin_step(recorder: Any, scheduler_output: Any) -> tuple:
    scheduled = scheduled_step(scheduler_output)
    return scheduled, recorder.begin_step(scheduled)


def scheduled_step(scheduler_output: Any) -> ScheduledStep:
    """The recorder's plain view of a SchedulerOutput (vLLM's lists, not copied)."""
    new_requests = scheduler_output.scheduled_new_reqs
    running = scheduler_output.scheduled_cached_reqs
    return ScheduledStep(
        scheduler_output.total_num_scheduled_tokens,
        scheduler_output.num_scheduled_tokens,
        list(getattr(scheduler_output, "finished_req_ids", None) or ()),
        [(r.req_id, _prompt_len(r), *getattr(r, _TRACE, NO_TRACE)) for r in new_requests],
        [(r.req_id, r.num_computed_tokens) for r in new_requests],
        running.req_ids,
        running.num_computed_tokens,
    )


def _prompt_len(new_request: Any) -> int:
    if new_request.prompt_token_ids is not None:
        return len(new_request.prompt_token_ids)
    embeds = getattr(new_request, "prompt_embeds", None)
    return int(embeds.shape[0]) if embeds is not None else 0


def _wrap_dummy_run(original: Callable) -> Callable:
    def _dummy_run(self, *args, **kwargs):
        recorder = getattr(self, _RECORDER, None)
        if recorder:  # a data-parallel rank's idle step, say: its made-up tokens must not count
            _telemetry(recorder, recorder.before_other_forward)
        return original(self, *args, **kwargs)

    return _dummy_run


def _telemetry(recorder: Any, call: Callable, *args) -> Any:
    """Run a recorder call on the engine thread, timed (what telemetry costs vLLM's
    engine loop); telemetry never fails a step."""
    started = time.perf_counter_ns()
    try:
        if profiler_ranges.profiling():
            with profiler_ranges.telemetry_range():
                return call(*args)
        return call(*args)
    except Exception:
        recorder.failed_steps += 1
        if recorder.failed_steps == 1:
            logger.exception("otel-moe: recording a step failed; later failures are only counted")
        return None
    finally:
        recorder.engine_thread_ns += time.perf_counter_ns() - started


def _wrap_shutdown(original: Callable) -> Callable:
    def shutdown(self, *args, **kwargs):
        recorder = getattr(self, _RECORDER, None)
        if recorder:
            recorder.close()  # flush while the engine goes down, not only at process exit
        return original(self, *args, **kwargs)

    return shutdown


def batch_order(runner: Any) -> list[str]:
    """Request ids in the order the step's tokens were laid out in the batch."""
    state = getattr(runner, "execute_model_state", None)
    batch = getattr(state, "input_batch", None)  # Model Runner V2
    if batch is None:
        batch = runner.input_batch  # Model Runner V1 / CPU (persistent batch)
    return list(batch.req_ids)


def find_moe_layers(model: Any) -> dict[int, Any]:
    """Decoder layer index -> MoE module (one that owns a router), by module walk.

    Routers are not nn.Modules; the MoE layer module that owns one is, and its
    name (``model.layers.N.mlp.experts``) gives N.
    """
    layers: dict[int, Any] = {}
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        if router is None or not callable(getattr(router, "select_experts", None)):
            continue
        match = _LAYER_IN_NAME.search(getattr(module, "layer_name", None) or name)
        if match is None:
            logger.warning("otel-moe: MoE module %s has no layer index in its name; skipped", name)
            continue
        layers[int(match.group(1))] = module
    return layers


def attach(runner: Any, config: Config) -> Optional[Any]:
    """Allocate buffers and bind routers for this worker; returns its recorder."""
    moe_layers = find_moe_layers(runner.get_model())
    if not moe_layers:
        logger.warning("otel-moe: the model has no MoE layers; nothing to record")
        return None
    config.layers.check_against(set(moe_layers))
    parallel = runner.vllm_config.parallel_config
    if (
        config.expected_moe_layers is not None
        and parallel.pipeline_parallel_size == 1
        and config.expected_moe_layers != len(moe_layers)
    ):
        logger.warning(
            "otel-moe: %s=%d but the model has %d MoE layers; the model's count is used",
            NUM_MOE_LAYERS, config.expected_moe_layers, len(moe_layers),
        )
    if _tensor_parallel_rank() != 0:
        return None  # every TP rank routes the same tokens: rank 0 records them once
    vllm_config = runner.vllm_config
    dp_rank = getattr(vllm_config.parallel_config, "data_parallel_rank", 0) or 0
    control = None
    if config.control_path:
        from otel_moe.control import ControlState, ControlWatcher
        from otel_moe.control.workers import WorkerReport

        control = ControlWatcher(config.control_path, ControlState.from_config(config),
                                 validate=lambda state: state.layers.check_against(set(moe_layers)),
                                 report=WorkerReport(config.control_path, dp_rank, sorted(moe_layers)))
    # Under live control any layer may be asked for later, so all are captured;
    # the recorder snapshots only the selected ones.
    selected = sorted(layer for layer in moe_layers if control or config.layers.wants(layer))
    if not selected:
        return None  # another pipeline stage holds the selected layers
    first_router = moe_layers[selected[0]].router
    buffers = RoutingBuffers(
        layers=selected,
        max_tokens=_max_tokens_per_forward(vllm_config),
        top_k=first_router.top_k,
        num_experts=first_router.global_num_experts,
        device=runner.device,
        tokens=bool(control) or config.mode == "tokens",  # live control may switch either way at any time
    )
    if control or config.mode == "counts":
        buffers.enable_counts()  # before the routers are bound: their writers add to its counters
    for slot, layer in enumerate(selected):
        bind_router(moe_layers[layer], buffers, slot)
    for layer, module in moe_layers.items():  # recorded or not: the profiler trace shows every MoE layer
        if not _wrap_layer_forward(module, layer):
            logger.debug("otel-moe: layer %d has no per-layer forward to put a profiler range around", layer)

    resource = {
        schema.RUN_ID: os.environ.get(RUN_ID_VARIABLE, ""),
        "vllm.model": str(vllm_config.model_config.model),
        "vllm.data_parallel_rank": dp_rank,
        "process.pid": os.getpid(),
        schema.NUM_EXPERTS: buffers.num_experts,  # metrics name only the experts that got tokens
    }
    exporter = ExporterLink(
        {"destinations": list(config.destinations), "mode": config.mode, "metrics": config.metrics, "resource": resource,
         "top_k": buffers.top_k, "num_experts": buffers.num_experts, "dp_rank": dp_rank,
         "internal_id_suffix": "" if _request_id_randomization_disabled() else INTERNAL_ID_SUFFIX},
        ring_bytes=config.ring_mb << 20, backlog_messages=config.queue_steps,
    )
    recorder = StepRecorder(
        buffers,
        config,
        exporter,
        dp_rank=dp_rank,
        control=control,
        run_id=resource[schema.RUN_ID],
        model_moe_layers=sorted(moe_layers),
    )
    # Spawned vLLM processes leave through multiprocessing, which skips atexit
    # but runs its own finalizers; the main process runs those at exit too.
    multiprocessing.util.Finalize(recorder, recorder.close, exitpriority=100)
    logger.info(
        "otel-moe: recording %s layers %s (top_k=%d, %d experts) to %s through exporter pid %d%s",
        config.mode, recorder.layers, buffers.top_k, buffers.num_experts, ", ".join(config.destinations),
        exporter.proc.pid,
        f"; live control through {config.control_path} ({'on' if recorder.recording else 'off'} now)" if control else "",
    )
    return recorder


def _wrap_layer_forward(moe_module: Any, layer: int) -> bool:
    """Put this MoE module's per-layer forward (``_forward_impl``, which vLLM's opaque
    ``moe_forward`` custom op calls at run time) in a profiler layer range. False when
    the module has no such method (an unknown vLLM layout)."""
    for attribute in ("_forward_impl", "forward_impl"):
        forward = getattr(moe_module, attribute, None)
        if callable(forward):
            setattr(moe_module, attribute, profiler_ranges.in_layer_range(forward, layer))
            return True
    return False


def bind_router(moe_module: Any, buffers: RoutingBuffers, slot: int) -> None:
    """Make this layer's router write its ids and weights into ``slot``."""
    router = moe_module.router
    if getattr(moe_module, "is_monolithic", False):
        logger.warning(
            "otel-moe: layer %d uses a monolithic MoE kernel that routes inside the kernel; "
            "it may not be captured", buffers.layers[slot],
        )
    write_ids = buffers.ids_writer(slot)
    write_weights = buffers.weights_writer(slot)
    ids_from_hook = callable(getattr(router, "set_capture_fn", None)) and hasattr(router, "capture_fn")
    if ids_from_hook:
        # vLLM's hook sees logical ids, before any EPLB mapping; keep a hook already set.
        previous = router.capture_fn

        def capture_ids(topk_ids):
            write_ids(topk_ids)
            if previous is not None:
                previous(topk_ids)

        router.set_capture_fn(capture_ids)
    select_experts = router.select_experts

    def select_experts_and_capture(*args, **kwargs):
        topk_weights, topk_ids = select_experts(*args, **kwargs)
        if write_weights is not None:
            write_weights(topk_weights)
        if not ids_from_hook:
            write_ids(topk_ids)
        return topk_weights, topk_ids

    router.select_experts = select_experts_and_capture


def _max_tokens_per_forward(vllm_config: Any) -> int:
    tokens = vllm_config.scheduler_config.max_num_batched_tokens
    capture = getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0
    return max(tokens, capture)


def _tensor_parallel_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:
        return 0


def _request_id_randomization_disabled() -> bool:
    try:
        import vllm.envs as envs

        return bool(getattr(envs, "VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", False))
    except Exception:
        return False
