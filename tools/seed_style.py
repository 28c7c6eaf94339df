"""A faithful re-implementation of the prototype's hook, for benchmarks only.

The prototype (a fork of vLLM) wrapped the router's select_experts and, in every
forward of every layer, copied the ids and weights to the host and wrote one JSON
line per token to a file: profile, warm-up and padded rows included. It cannot
run under torch.compile or CUDA graphs, so it is measured in eager mode.
"""
from __future__ import annotations

import json
import re


def install(path: str):
    """Returns a function for ``LLM.collective_rpc`` that hooks the worker's routers."""

    def hook_worker(worker) -> int:
        model = worker.model_runner.get_model()
        log = open(path, "a", buffering=1 << 20)
        hooked = 0
        for name, module in model.named_modules():
            router = getattr(module, "router", None)
            if router is None or not hasattr(router, "select_experts"):
                continue
            layer = int(re.search(r"layers\.(\d+)", getattr(module, "layer_name", name)).group(1))
            original = router.select_experts

            def select_experts(*args, _original=original, _layer=layer, **kwargs):
                weights, ids = _original(*args, **kwargs)
                for row_ids, row_weights in zip(ids.cpu().tolist(), weights.cpu().tolist()):
                    log.write(json.dumps({"layer": _layer, "expert_ids": row_ids, "expert_weights": row_weights}) + "\n")
                return weights, ids

            router.select_experts = select_experts
            hooked += 1
        return hooked

    return hook_worker
