"""Reading DeepSpeed configs (the HF integration fills their "auto" values itself)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import UserError


def read_ds_config(config: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """The `--deepspeed` value as a dict: a JSON file path or an already parsed dict."""
    if config is None or isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise UserError(f"--deepspeed {config} does not exist; use one of ds_configs/*.json.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"--deepspeed {config} is not valid JSON (line {err.lineno}: {err.msg}).") from None


def zero_stage(config: str | dict[str, Any] | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config, or None without DeepSpeed."""
    values = read_ds_config(config)
    if values is None:
        return None
    return int(values.get("zero_optimization", {}).get("stage", 0))


def init_single_process_env() -> None:
    """Make a process started without a launcher a world of one for `deepspeed.initialize`.

    Stages that build their DeepSpeed engine themselves also run as plain `python -m ...`;
    without the launcher's RANK/WORLD_SIZE/MASTER_* DeepSpeed would try MPI discovery. A run
    under a launcher (RANK set) is left alone.
    """
    import os
    import socket

    if "RANK" in os.environ:
        return
    with socket.socket() as sock:  # a free port for the one-member process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", str(port))})
    # accelerate, seeing a distributed CPU run, would set this to the core count itself and warn.
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
