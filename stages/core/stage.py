"""Steps every HF-Trainer stage takes in the same way: output_dir checks, config dump, saving."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from .errors import UserError

logger = logging.getLogger(__name__)

CONFIG_FILE = "run_config.json"
STAGING_DIR = ".saving"  # under output_dir: checkpoints being written (never a resume candidate)
# Secret-bearing argument names: hub_token-style keys (as TrainingArguments.to_dict sees them) and
# anything naming a key/password. Plain "token" inside a name (max_new_tokens) is not a secret.
SECRET_WORDS = ("api_key", "password", "secret")


class CurrentStderrHandler(logging.StreamHandler):
    """A stream handler writing to whatever `sys.stderr` is when a record is emitted.

    A plain StreamHandler keeps the stream of the moment it was made; a stage run twice in one
    process (tests, notebooks) after stderr was swapped would write to a closed file.
    """

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler's __init__/setStream: the stream is always sys.stderr
        pass


def setup_logging() -> None:
    """INFO on global rank 0, warnings elsewhere (so the logs are read once, not N times)."""
    import transformers

    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    transformers.utils.logging.set_verbosity(level)
    # One handler, the root's: transformers' own handler would print every line a second time
    # through the root logger where the CI variable is set (it then propagates).
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()


def prepare_output_dir(training_args, run_args) -> None:
    """Refuse to write into a run that exists; resolve `--resume_from_checkpoint last`.

    An output_dir that already holds files is someone's run: it is only written into with
    `--overwrite_output_dir` or when resuming from one of its checkpoints.
    """
    from transformers.trainer_utils import get_last_checkpoint

    if not (training_args.do_train or training_args.do_eval or training_args.do_predict):
        raise UserError("nothing to do: add --do_train (and/or --do_eval, --do_predict).")
    output_dir = Path(training_args.output_dir or "")
    if not training_args.output_dir:
        raise UserError("--output_dir is required: the folder this run writes into.")
    resume = training_args.resume_from_checkpoint
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
    # Only global rank 0 judges: the other ranks may look after rank 0 has written its first
    # files (run_config.json) and would take them for an old run. If rank 0 refuses, the
    # launcher stops every rank. A folder holding only our run_config.json (an attempt that
    # stopped at a user error: the config is written before the data is read) and a first
    # checkpoint that never finished writing (`.saving/`, `.checkpoint-N.tmp`) is not a run.
    has_run = os.environ.get("RANK", "0") == "0" and output_dir.is_dir() and not all(
        _unfinished_attempt(path.name) for path in output_dir.iterdir())
    if has_run and training_args.do_train and not resume and not run_args.overwrite_output_dir:
        if get_last_checkpoint(str(output_dir)) is None:
            raise UserError(f"--output_dir {output_dir} already holds a run (with no checkpoint to continue from); "
                            f"pick a new folder, or add --overwrite_output_dir to start it again there.")
        raise UserError(f"--output_dir {output_dir} already holds a run; pick a new folder, add "
                        f"--resume_from_checkpoint last to continue it, or --overwrite_output_dir to write over it.")
    output_dir.mkdir(parents=True, exist_ok=True)


def _unfinished_attempt(name: str) -> bool:
    """A file or folder of output_dir that a run leaves when it stops before its first checkpoint is whole."""
    return name in (CONFIG_FILE, STAGING_DIR) or (name.startswith(".checkpoint-") and name.endswith(".tmp"))


def check_checkpoint_files(folder: Path) -> None:
    """Refuse a checkpoint whose safetensors files are truncated or corrupt (header against file size) or
    whose JSON files do not parse, before anything is loaded; the message names the file."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.rglob("*")):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):  # reads the header only; checks it covers the file
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except (SafetensorError, OSError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"--resume_from_checkpoint {folder}: {path} is truncated or corrupt ({reason}); resume "
                            f"from an earlier checkpoint-N folder, or drop the flag to start anew.") from None


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
    import sys

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


def save_rng_state(path: Path) -> None:
    """This process's random generators (torch, the accelerator's, numpy, Python) as one safetensors file."""
    import random

    import numpy as np
    import torch
    from safetensors.torch import save_file

    version, python_keys, python_gauss = random.getstate()
    numpy_name, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
               "python": torch.tensor(python_keys, dtype=torch.int64)}
    if torch.accelerator.is_available():
        tensors["accelerator"] = torch.get_device_module().get_rng_state()
    metadata = {"python": json.dumps([version, python_gauss]),
                "numpy": json.dumps([numpy_name, int(numpy_pos), int(numpy_has_gauss), float(numpy_gauss)])}
    save_file(tensors, str(path), metadata=metadata)


def restore_rng_state(path: Path) -> None:
    """Set this process's random generators to those `save_rng_state` wrote."""
    import random

    import numpy as np
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
    torch.set_rng_state(tensors["torch"])
    if "accelerator" in tensors and torch.accelerator.is_available():
        torch.get_device_module().set_rng_state(tensors["accelerator"])
    version, python_gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(tensors["python"].tolist()), python_gauss))
    numpy_name, numpy_pos, numpy_has_gauss, numpy_gauss = json.loads(metadata["numpy"])
    np.random.set_state((numpy_name, tensors["numpy"].numpy().astype(np.uint32), numpy_pos, numpy_has_gauss,
                         numpy_gauss))


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
