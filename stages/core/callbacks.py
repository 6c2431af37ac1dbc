"""Run bookkeeping shared by the stages: trainer_log.jsonl, loss plots, W&B set-up."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

LOG_FILE = "trainer_log.jsonl"


class JsonlLogCallback(TrainerCallback):
    """Append every logged dict (with step and epoch) to output_dir/trainer_log.jsonl, rank 0 only."""

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        with open(Path(args.output_dir) / LOG_FILE, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")


def log_step(output_dir: str | Path, stage: str, record: dict[str, Any]) -> None:
    """One line of trainer_log.jsonl, and the same values to W&B as `<stage>/<key>` when a run is active.

    For stages with their own loop (no HF Trainer); the caller is global rank 0 and `record`
    holds "step".
    """
    import sys

    with open(Path(output_dir) / LOG_FILE, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
    wandb = sys.modules.get("wandb")  # only when init_wandb started a run
    if wandb is not None and wandb.run is not None:
        wandb.log({f"{stage}/{k}": v for k, v in record.items() if k != "step"}, step=record["step"])


def read_log(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average, the usual TensorBoard-style smoothing of a loss curve."""
    out, last = [], values[0] if values else 0.0
    for value in values:
        last = last * weight + (1 - weight) * value
        out.append(last)
    return out


def plot_loss(output_dir: str | Path, keys: tuple[str, ...] = ("loss", "eval_loss"),
              save_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per logged key (raw and smoothed) from trainer_log.jsonl; returns the files.

    The PNGs go into `save_dir` (default: output_dir itself)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(output_dir)
    written = []
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
                  and math.isfinite(r[key])]
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        if len(values) > 1:
            ax.plot(steps, _smooth(list(values), 1.8 / (1 + math.exp(-0.05 * len(values))) - 1),
                    color="#1f77b4", label="smoothed")
        ax.set_title(f"{key} of {Path(output_dir).name}")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.legend()
        path = Path(save_dir or output_dir) / f"training_{key.replace('/', '_')}.png"
        fig.savefig(path, format="png", dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _wandb_has_account() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def init_wandb(stage: str, training_args, run_args, config: dict[str, Any]) -> None:
    """Start the W&B run on global rank 0 with our naming and the resolved config.

    The HF WandbCallback then reuses this run. Stages of one pipeline share `wandb_group`;
    the job type defaults to the stage. Without an account, W&B runs offline (a local run
    that `wandb sync` uploads later). Keys are never printed or stored in configs.
    """
    if "wandb" not in (training_args.report_to or []) or os.environ.get("RANK", "0") != "0":
        return
    if "WANDB_MODE" not in os.environ and not _wandb_has_account():
        os.environ["WANDB_MODE"] = "offline"
        logger.info("W&B: no account configured, logging offline (sync later with `wandb sync`).")
    import wandb

    if wandb.run is not None:
        return
    wandb.init(
        project=os.environ.get("WANDB_PROJECT") or (training_args.project if training_args.project != "huggingface"
                                                    else "stages"),
        group=run_args.wandb_group or os.environ.get("WANDB_RUN_GROUP"),
        job_type=run_args.wandb_job_type or stage,
        name=training_args.run_name or f"{stage}-{Path(training_args.output_dir).name}",
        dir=os.environ.get("WANDB_DIR"),
        config=config,
    )
