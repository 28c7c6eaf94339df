"""HTTP endpoints for live control on ``vllm serve``, mounted through vLLM's
public ``--middleware`` option::

    VLLM_LOG_MOE=otlp VLLM_LOG_MOE_CONTROL=/tmp/moe-control.json \\
        vllm serve MODEL --middleware otel_moe.control.http.middleware

    GET  /otel_moe/recording          the state the control file asks for, and under
                                      "workers" what each recording worker applied or refused
    POST /otel_moe/recording/start    recording on  (optional JSON body: layers, mode)
    POST /otel_moe/recording/stop     recording off
    POST /otel_moe/recording          JSON body with any of recording, layers, mode

The handler only rewrites the control file (see ``otel_moe.control``); every
recording worker applies the change at its next engine step, so a request sent
after the response is recorded (or not) as asked. With an API key set
(``--api-key`` / ``VLLM_API_KEY``) these endpoints require it as a Bearer token.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
from typing import Any, Callable, Optional

from otel_moe import config as flags
from otel_moe.control import RECORDING, ControlError, ControlFile, ControlState

PREFIX = "/otel_moe/recording"
_ACTIONS = {"": None, "/start": {RECORDING: True}, "/stop": {RECORDING: False}}


async def middleware(request: Any, call_next: Any) -> Any:
    path = request.url.path.removeprefix(request.scope.get("root_path", ""))
    if not path.startswith(PREFIX):
        return await call_next(request)
    from starlette.responses import JSONResponse

    status, body = await _handle(request, path[len(PREFIX):])
    return JSONResponse(body, status_code=status)


async def _handle(request: Any, action: str) -> tuple[int, dict]:
    if action not in _ACTIONS:
        return 404, {"error": f"unknown otel-moe endpoint; use {PREFIX}, {PREFIX}/start or {PREFIX}/stop"}
    if not _authorized(request):
        return 401, {"error": "Unauthorized"}
    try:
        cfg = flags.from_env()
    except flags.ConfigError as err:
        return 409, {"error": str(err)}
    if cfg is None or not cfg.control_path:
        return 409, {"error": f"live control is off: start vLLM with {flags.LOG_MOE} and "
                              f"{flags.CONTROL}=<file> set"}
    control, base = ControlFile(cfg.control_path), ControlState.from_config(cfg)
    if request.method == "GET" and action == "":
        return await _answer(lambda: control.status(base))
    if request.method != "POST":
        return 405, {"error": f"{request.method} is not allowed here; use GET {PREFIX} or POST"}
    changes = dict(_ACTIONS[action] or {})
    body = await request.body()
    if body.strip():
        try:
            requested = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            return 400, {"error": "otel-moe: the request body is not UTF-8"}
        except RecursionError:
            return 400, {"error": "otel-moe: the request body is nested too deeply"}
        except json.JSONDecodeError as err:
            return 400, {"error": f"otel-moe: the request body is not JSON: {err}"}
        if not isinstance(requested, dict):
            return 400, {"error": "otel-moe: the request body must be a JSON object"}
        changes = {**requested, **changes}  # /start and /stop decide recording themselves
    def update() -> dict:
        control.update(changes, base)
        return control.status(base)

    return await _answer(update)


async def _answer(call: Callable[[], dict]) -> tuple[int, dict]:
    """What the file asks for now, with each recording worker's answer (``workers``)."""
    try:
        answer = await asyncio.to_thread(call)
    except ControlError as err:
        return 400, {"error": str(err)}
    except OSError as err:
        return 500, {"error": f"otel-moe: control file: {err}"}
    return 200, answer


def _authorized(request: Any) -> bool:
    keys = _api_keys(request)
    if not keys:
        return True
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    digest = hashlib.sha256(token.encode()).digest()
    return any(secrets.compare_digest(digest, hashlib.sha256(k.encode()).digest()) for k in keys)


def _api_keys(request: Any) -> list[str]:
    args: Optional[Any] = getattr(request.app.state, "args", None)
    keys = getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY", "")]
    if isinstance(keys, str):
        keys = [keys]
    return [k for k in keys if k]
