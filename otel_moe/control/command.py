"""``otel-moe control``: live control from a shell (the same file the HTTP endpoints write)."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from otel_moe.config import CONTROL, MODES, ConfigError, from_env, parse_layers
from otel_moe.control import LAYERS, MODE, RECORDING, ControlFile, ControlState


def add_arguments(parser: Any) -> None:
    parser.add_argument("action", choices=("status", "start", "stop", "set"),
                        help="status: print what the file asks for and what each recording worker applied; start/stop: recording on/off; "
                             "set: change --layers/--mode only")
    parser.add_argument("--file", default=os.environ.get(CONTROL, ""),
                        help=f"the control file (default: ${CONTROL})")
    parser.add_argument("--layers", help="layers to record: 'all', 3, 0,12, 0-5 ...")
    parser.add_argument("--mode", choices=MODES, help="tokens (every token's experts) or counts (per-step histograms)")


def run(args: Any) -> int:
    if not args.file:
        print(f"otel-moe control: no control file: pass --file or set {CONTROL}", file=sys.stderr)
        return 2
    changes: dict[str, Any] = {}
    if args.action in ("start", "stop"):
        changes[RECORDING] = args.action == "start"
    if args.layers is not None:
        changes[LAYERS] = args.layers
    if args.mode is not None:
        changes[MODE] = args.mode
    if args.action == "set" and not changes:
        print("otel-moe control set: give --layers and/or --mode", file=sys.stderr)
        return 2
    try:
        cfg = from_env()
        base = ControlState.from_config(cfg) if cfg else ControlState(True, parse_layers(""), MODES[0])
        control = ControlFile(args.file)
        if changes:
            control.update(changes, base)
        answer = control.status(base)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    except OSError as err:  # a missing folder, a read-only disk: said in one line
        print(f"otel-moe control: error: cannot use --file {args.file}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(json.dumps(answer))
    return 0
