"""Live control of recording: start, stop, switch layers and mode while vLLM runs.

The control channel is one small JSON file named by ``VLLM_LOG_MOE_CONTROL``::

    {"recording": true, "layers": "0,12-15", "mode": "counts"}

Every recording worker process (however many engines, DP ranks or API
servers there are on the host) looks at the file's identity (inode, mtime,
size: one ``os.stat``) once per real engine step, and re-reads it only when
that changed. Writers replace the file atomically (write + rename), so a
reader never sees half a file, and every write makes a new inode, so even two
writes within one filesystem timestamp tick are seen as a change.

A missing file means "as the flags say" (VLLM_LOG_LAYER, VLLM_LOG_MOE_MODE,
recording on). A file that does not parse is refused when the engine starts;
one that goes bad while it runs is logged and ignored (the last good state
stays), since telemetry must never fail the engine.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
from typing import Any, Callable, Mapping, Optional

from otel_moe.config import MODES, Config, ConfigError, LayerSelection, format_ranges, parse_layers
from otel_moe.control import workers

logger = logging.getLogger("vllm.otel_moe")

RECORDING, LAYERS, MODE = "recording", "layers", "mode"
FIELDS = (RECORDING, LAYERS, MODE)


class ControlError(ConfigError):
    """A control request or control file has a value otel-moe cannot use."""


@dataclasses.dataclass(frozen=True)
class ControlState:
    recording: bool
    layers: LayerSelection
    mode: str  # "tokens" | "counts"

    @classmethod
    def from_config(cls, config: Config) -> "ControlState":
        return cls(True, config.layers, config.mode)

    def as_json(self) -> dict:
        return {RECORDING: self.recording, LAYERS: self.layers.text, MODE: self.mode}

    def updated(self, changes: Mapping[str, Any], where: str = "control") -> "ControlState":
        """This state with ``changes`` applied; ``ControlError`` names the bad field."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise ControlError(f"otel-moe: {where}: unknown field(s) {unknown}; allowed: {', '.join(FIELDS)}")
        recording, layers, mode = self.recording, self.layers, self.mode
        if RECORDING in changes:
            recording = changes[RECORDING]
            if not isinstance(recording, bool):
                raise ControlError(f"otel-moe: {where}: {RECORDING}={recording!r} is invalid; allowed: true or false")
        if LAYERS in changes:
            text = changes[LAYERS]
            if isinstance(text, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in text):
                text = ",".join(str(v) for v in text)
            if not isinstance(text, str):
                raise ControlError(f"otel-moe: {where}: {LAYERS}={text!r} is invalid; allowed: a string like '0,3-5' or 'all', or a list of integers")
            try:
                layers = parse_layers(text, source=f"{where}: {LAYERS}")
            except ConfigError as err:
                raise ControlError(str(err)) from None
        if MODE in changes:
            mode = changes[MODE]
            if mode not in MODES:
                raise ControlError(f"otel-moe: {where}: {MODE}={mode!r} is invalid; allowed: {' or '.join(MODES)}")
        return ControlState(recording, layers, mode)


class ControlFile:
    """Reads and atomically rewrites the control file."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    def read(self, base: ControlState) -> ControlState:
        """The state the file asks for, over ``base`` (what the flags say)."""
        return base.updated(self.read_fields(), where=f"control file {self.path}")

    def read_fields(self) -> dict:
        """The fields the file sets (none when it is missing)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return {}
        try:
            content = json.loads(text)
        except json.JSONDecodeError as err:
            raise ControlError(f"otel-moe: control file {self.path} is not JSON: {err}") from None
        if not isinstance(content, dict):
            raise ControlError(f'otel-moe: control file {self.path} must hold a JSON object like {{"{RECORDING}": false}}')
        return content

    def update(self, changes: Mapping[str, Any], base: ControlState) -> ControlState:
        """Set ``changes`` in the file (other fields stay as they are) and return
        the state it now asks for over ``base``.

        Only the fields ever set are stored, so a writer whose flags differ from
        the engine's (a shell without VLLM_LOG_LAYER) never overrides the rest.
        Read-modify-write under a lock file: two API servers updating at once
        both take effect. Nothing is written when a value is invalid.
        """
        asked = base.updated(changes, where="request")  # refuse bad values with the request's words
        if LAYERS in changes:
            self._check_layers(asked.layers)
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fields = {**self.read_fields(), **changes}
            state = base.updated(fields, where=f"control file {self.path}")
            normal = state.as_json()  # [1, 3] is stored as "1,3"
            workers.replace_atomically(self.path, json.dumps({field: normal[field] for field in fields}) + "\n")
        return state

    def _check_layers(self, layers: LayerSelection) -> None:
        """Refuse layers no live recording worker has, once workers have said which they have."""
        have = workers.model_layers(workers.live_reports(self.path))
        if have is None or layers.layers is None:
            return
        missing = sorted(layers.layers - have)
        if missing:
            raise ControlError(f"otel-moe: request: {LAYERS}={layers.text!r}: the model has no MoE layer "
                               f"{format_ranges(missing)} (its MoE layers, as its recording workers report: "
                               f"{format_ranges(sorted(have)) or 'none'})")

    def status(self, base: ControlState) -> dict:
        """What the file asks for, and what each live recording worker applied."""
        return {**self.read(base).as_json(), "workers": workers.live_reports(self.path)}

class ControlWatcher:
    """Per-step view of the control file for one recording worker (engine thread)."""

    def __init__(self, path: str, defaults: ControlState,
                 validate: Callable[[ControlState], None] = lambda state: None,
                 report: Optional[workers.WorkerReport] = None) -> None:
        """``validate`` raises ``ConfigError`` for a state this worker cannot
        record (layers the model does not have); ``report``: where this worker
        answers what it applied and what it refused."""
        self.file = ControlFile(path)
        self.defaults = defaults
        self.validate = validate
        self.report = report
        self.version = 0  # bumped on every change applied
        self.refused: Optional[str] = None  # why the file's latest content was not applied
        self._identity = self._stat()
        self.state = self._read()  # a bad file refuses the start (ConfigError)
        self._answer()

    def _read(self) -> ControlState:
        state = self.file.read(self.defaults)
        self.validate(state)
        return state

    def _stat(self) -> Optional[tuple[int, int, int]]:
        try:
            st = os.stat(self.file.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def poll(self) -> bool:
        """Re-read the file if it changed; True when the state changed."""
        identity = self._stat()
        if identity == self._identity:
            return False
        self._identity = identity
        try:
            state = self._read()
        except (ConfigError, OSError) as err:
            reason = str(err).removeprefix("otel-moe: ")
            logger.error("otel-moe: %s; recording stays %s", reason, json.dumps(self.state.as_json()))
            self._answer(reason)
            return False
        if state == self.state:
            if self.refused:
                self._answer()  # asked again for what it has: the refusal is over
            return False
        self.state = state
        self.version += 1
        logger.info("otel-moe: control: recording is now %s", json.dumps(state.as_json()))
        self._answer()
        return True

    def _answer(self, refused: Optional[str] = None) -> None:
        self.refused = refused
        if self.report is not None:
            self.report.write(self.state.as_json(), self.version, refused)

    def close(self) -> None:
        if self.report is not None:
            self.report.remove()

