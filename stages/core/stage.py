"""The preamble of every stage (`start_stage`) and the steps stages share: the output-dir policy, the resolved
config, training and saving, the NaN checks."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import STAGING_DIR, check_checkpoint_files
from .errors import UserError

logger = logging.getLogger(__name__)

CONFIG_FILE = "run_config.json"
# Secret-bearing argument names: hub_token-style keys (as TrainingArguments.to_dict sees them) and
# anything naming a key/password. Plain "token" inside a name (max_new_tokens) is not a secret.
SECRET_WORDS = ("api_key", "password", "secret")


@dataclass
class Run:
    """What the preamble hands a stage: where it writes, its resolved config, its place among the ranks."""

    stage: str
    output_dir: Path
    config: dict[str, Any]
    rank: int
    world: int
    zero_stage: int | None  # None without DeepSpeed
    training_args: Any
    run_args: Any

    @property
    def zero3(self) -> bool:
        return self.zero_stage == 3

    def start_wandb(self) -> None:
        """Open the W&B run (global rank 0, with `--report_to wandb`) once the stage is about to train or score."""
        from .callbacks import init_wandb

        init_wandb(self.stage, self.training_args, self.run_args, self.config)


def start_stage(stage: str, arg_types: list[type], argv: list[str] | None, *, trainer: bool = False,
                train_only: bool = False, zero3: bool = True, checkpoints: bool = False,
                resumable: bool = False) -> tuple[tuple[Any, ...], Run]:
    """The preamble of every stage: parse, check the model, optimizer and data, claim output_dir, save the config.

    trainer: the HF Trainer builds the optimizer (pt, sft, rm, ppo): `--optim` is checked, and one of
        --do_train/--do_eval/--do_predict is required. Other stages keep the base model frozen.
    train_only: the stage only trains (ppo, projector): --do_train is implied.
    zero3: whether the stage runs under ZeRO-3; one that cannot is refused here, with the reason.
    checkpoints: the stage writes checkpoint-N folders: `--resume_from_checkpoint last` resolves to the
        newest one, and a given folder is checked for truncated files before anything loads.
    resumable: the stage continues its own output_dir when --resume_from_checkpoint is set (implied by
        `checkpoints`); a refused output_dir then names that way out.
    Every stage is seeded with --seed here, before any model is built (LoRA's initial A is random).
    Returns the parsed argument objects, in the order of `arg_types`, and the `Run`.
    """
    from transformers import set_seed

    from .arguments import DataArguments, FinetuningArguments, ModelArguments, RunArguments, parse_stage_args
    from .loader import check_model_args

    args, zero = parse_stage_args(arg_types, argv, stage)
    training_args = next(a for a in args if hasattr(a, "output_dir"))
    run_args = next((a for a in args if isinstance(a, RunArguments)), RunArguments())
    model_args = next((a for a in args if isinstance(a, ModelArguments)), None)
    data_args = next((a for a in args if isinstance(a, DataArguments)), None)
    finetuning_args = next((a for a in args if isinstance(a, FinetuningArguments)), FinetuningArguments())
    if model_args is not None:
        check_model_args(model_args, finetuning_args, zero)
    if zero == 3 and not zero3:
        raise UserError(f"--deepspeed {training_args.deepspeed} is ZeRO-3, which {stage} cannot use: it runs data "
                        f"parallel (each rank holds the whole model); use a ZeRO-0/2 config such as "
                        f"ds_configs/zero2.json.")
    if data_args is not None:
        from .data.loading import check_datasets

        # An unknown name or a missing file fails here, before any model or data is loaded.
        check_datasets(data_args.dataset_names + data_args.eval_dataset_names, data_args.dataset_dir)
    if train_only:
        training_args.do_train = True
    if trainer:
        from .arguments import check_optim_installed

        check_optim_installed(training_args)
        if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
            raise UserError("nothing to do: add --do_train (and/or --do_eval, --do_predict).")
    if checkpoints:
        resolve_resume(training_args)
    rank, world = training_args.process_index, training_args.world_size  # sets up the ranks under the launcher
    out = prepare_output_dir(training_args.output_dir, overwrite=run_args.overwrite_output_dir,
                             resume=bool(training_args.resume_from_checkpoint),
                             resumable=resumable or (checkpoints and _holds_checkpoint(training_args.output_dir)))
    config = resolved_config(stage, *args)
    save_config(str(out), config)
    set_seed(training_args.seed)
    return args, Run(stage, out, config, rank, world, zero, training_args, run_args)


def resolve_resume(training_args) -> None:
    """`--resume_from_checkpoint last` -> output_dir's newest checkpoint-N; the folder's files checked."""
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(training_args.output_dir or "")
    resume = training_args.resume_from_checkpoint
    if resume == "auto":  # the projector's spelling, kept for one release
        logger.info("--resume_from_checkpoint auto is renamed --resume_from_checkpoint last; the old name is accepted "
                    "until the next release.")
        resume = "last"
    if resume in ("last", "true", "True", True):
        last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if last is None:
            raise UserError(f"--resume_from_checkpoint {resume}: {output_dir} holds no checkpoint-* folder to resume; "
                            f"drop the flag to start a new run.")
        training_args.resume_from_checkpoint = last
    elif resume and not Path(resume).is_dir():
        raise UserError(f"--resume_from_checkpoint {resume} is not a checkpoint folder; give a checkpoint-N path "
                        f"or 'last'.")
    if training_args.resume_from_checkpoint:
        check_checkpoint_files(Path(training_args.resume_from_checkpoint))


def prepare_output_dir(output_dir: str | None, *, overwrite: bool, resume: bool = False,
                       resumable: bool = False) -> Path:
    """One policy for every stage's output_dir: a folder that holds a run is written into only when resuming
    it or with --overwrite_output_dir. Returns the folder, created.

    Only global rank 0 judges: the other ranks may look after rank 0 has written its first
    files (run_config.json) and would take them for an old run. If rank 0 refuses, the
    launcher stops every rank. A folder holding only our run_config.json (an attempt that
    stopped at a user error: the config is written before the data is read) and a first
    checkpoint that never finished writing (`.saving/`, `.checkpoint-N.tmp`) is not a run.
    """
    if not output_dir:
        raise UserError("--output_dir is required: the folder this run writes into.")
    out = Path(output_dir)
    has_run = os.environ.get("RANK", "0") == "0" and out.is_dir() and not all(
        _unfinished_attempt(path.name) for path in out.iterdir())
    if has_run and not resume and not overwrite:
        resume_hint = "add --resume_from_checkpoint last to continue it, " if resumable else ""
        raise UserError(f"--output_dir {out} already holds a run; pick a new folder, {resume_hint}or add "
                        f"--overwrite_output_dir to write over it.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _holds_checkpoint(output_dir: str | None) -> bool:
    return bool(output_dir) and Path(output_dir).is_dir() and any(Path(output_dir).glob("checkpoint-*"))


def _unfinished_attempt(name: str) -> bool:
    """A file or folder of output_dir that a run leaves when it stops before its first checkpoint is whole."""
    return name in (CONFIG_FILE, STAGING_DIR) or (name.startswith(".checkpoint-") and name.endswith(".tmp"))


def _secret(key: str) -> bool:
    key = key.lower()
    return key == "token" or key.endswith("_token") or any(word in key for word in SECRET_WORDS)


def _redact(values: dict[str, Any]) -> dict[str, Any]:
    return {k: ("<redacted>" if v and _secret(k) else v) for k, v in values.items()}


def _redact_argv(argv: list[str]) -> list[str]:
    """The command line less the launcher's --local_rank, with the value of a secret flag redacted."""
    out: list[str] = []
    for arg in argv:
        if arg.startswith("--local_rank"):
            continue
        flag, eq, _ = arg.partition("=")
        if flag.startswith("--") and eq and _secret(flag[2:]):
            arg = f"{flag}=<redacted>"
        elif out and out[-1].startswith("--") and "=" not in out[-1] and _secret(out[-1][2:]):
            arg = "<redacted>"
        out.append(arg)
    return out


def resolved_config(stage: str, *arg_objects) -> dict[str, Any]:
    """All argument values of the run, secrets redacted, JSON-serialisable.

    `argv` is the command line as given (less the launcher's --local_rank): which values the
    user chose, so `stages.report` can print the command that reproduces the run.
    """
    merged: dict[str, Any] = {"stage": stage, "argv": _redact_argv(sys.argv[1:])}
    for obj in arg_objects:
        values = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
        merged.update(values)
    return json.loads(json.dumps(_redact(merged), default=str))


def save_config(output_dir: str, config: dict[str, Any]) -> None:
    if os.environ.get("RANK", "0") == "0":
        Path(output_dir, CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")


def add_perplexity(metrics: dict[str, float], prefix: str = "eval") -> dict[str, float]:
    loss = metrics.get(f"{prefix}_loss")
    if loss is not None:
        metrics[f"{prefix}_perplexity"] = math.exp(loss) if loss < 700 else float("inf")
    return metrics


def train_and_save(trainer, training_args, run_args, plot_keys: tuple[str, ...] = ("loss", "eval_loss")) -> None:
    """Train (resuming if asked), save weights/state/metrics, and plot the losses."""
    from .callbacks import plot_loss

    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # StageTrainer: safetensors + JSON, no pickled TrainingArguments
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if trainer.is_world_process_zero() and run_args.plot_loss:
        plot_loss(training_args.output_dir, keys=plot_keys)


def finite_on_every_rank(loss: Any, world: int) -> bool:
    """Whether `loss` is finite on every rank. All ranks call it and get the same answer, so they all
    take the same branch: none is left waiting alone in the backward's gradient reduction."""
    import torch

    finite = torch.isfinite(loss.detach()).all().to(torch.int32)
    if world > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return bool(finite)


def no_gradient_loss(parameters: Any) -> Any:
    """A zero that reaches every trainable parameter (`--nan_policy skip`): each rank still runs the same
    backward and gradient reduction, and the micro-batch adds no gradient."""
    return sum((param * 0).sum() for param in parameters if param.requires_grad)
