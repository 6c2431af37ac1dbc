"""Trainer subclasses of the stages.

Kept out of the stage modules because importing transformers' Trainer pulls in peft and
bitsandbytes (seconds): `import stages.sft` stays light, and `run_sft` imports the class.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoint import (OPTIMIZER, optimizer_state_from_files, optimizer_state_to_files, restore_rng_state,
                         save_rng_state, staged_checkpoint)
from .errors import RunStopped, UserError
from .stage import no_gradient_loss

logger = logging.getLogger(__name__)


# What a checkpoint holds besides the weights, as safetensors + JSON (Trainer's own files are pickles).
# The optimizer's files are STEM.safetensors + STEM.json (optimizer_state_to_files).
OPTIMIZER_TENSORS, OPTIMIZER_JSON = f"{OPTIMIZER}.safetensors", f"{OPTIMIZER}.json"
SCHEDULER_JSON, SCALER_JSON, RNG_FILE = "scheduler.json", "scaler.json", "rng_state_{rank}.safetensors"
# Under DeepSpeed: every trained tensor's fp32 master, whole (the saved model may be bf16; ZeRO splits the master);
# the optimizer state of each rank, where it is not one value per weight element (optimizer_state_to_files).
TRAINED_WEIGHTS, RANK_OPTIMIZER = "trained_weights.safetensors", OPTIMIZER + "_rank{rank}"


@contextlib.contextmanager
def _whole_tensor_deepspeed_checkpoints():
    """Let Trainer resume a DeepSpeed run from our checkpoint format.

    Under DeepSpeed, Trainer hands a checkpoint to the engine's own loader (which wants its
    pickled global_step*/ files) before calling `_load_optimizer_and_scheduler`, and again for
    `load_best_model_at_end`. For our checkpoints that call puts the trained weights back
    (fp32 masters too) and the optimizer state follows in `_load_deepspeed_state`.
    """
    import glob

    import transformers.trainer as hf_trainer

    from .distributed import restore_weights

    engine_loader = hf_trainer.deepspeed_load_checkpoint

    def load(engine: Any, checkpoint: str, **kwargs: Any) -> None:
        if os.path.isfile(os.path.join(checkpoint, TRAINED_WEIGHTS)):
            restore_weights(engine.module, engine.optimizer, load_file(os.path.join(checkpoint, TRAINED_WEIGHTS)))
        elif glob.glob(os.path.join(checkpoint, "global_step*")):  # written by DeepSpeed's engine
            engine_loader(engine, checkpoint, **kwargs)
        else:
            raise UserError(f"--resume_from_checkpoint {checkpoint} was written without DeepSpeed (no "
                            f"{TRAINED_WEIGHTS}); resume it without --deepspeed, on one process.")

    hf_trainer.deepspeed_load_checkpoint = load
    try:
        yield
    finally:
        hf_trainer.deepspeed_load_checkpoint = engine_loader


class StageTrainer(Trainer):
    """The Trainer of the HF stages: never steps on a NaN/inf loss; checkpoints appear whole.

    Checkpoints go through `staged_checkpoint`: written under `output_dir/.saving/` and renamed to
    `checkpoint-N` once every rank has finished writing, so a crash while saving leaves no half-written
    `checkpoint-N` (the previous one stays the last, and `--resume_from_checkpoint last` takes it).

    `nan_policy="stop"` raises `RunStopped` before the backward pass, so the weights, the
    optimizer and every checkpoint already saved stay as they were; `"skip"` replaces the
    micro-batch's loss by a zero that still reaches every trainable parameter (each rank then
    runs the same backward and gradient reduction) and counts it.
    """

    def __init__(self, *args, nan_policy: str = "stop", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_policy = nan_policy
        self.skipped_batches = 0

    def model_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The stage's loss (a subclass's override point); Trainer's by default."""
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = self.model_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        if not model.training or bool(torch.isfinite(loss.detach()).all()):
            return result
        step = self.state.global_step + 1
        if self.nan_policy == "stop":
            for callback in self.callback_handler.callbacks:  # the bar's last line before the message
                if isinstance(callback, ProgressCallback) and callback.training_bar is not None:
                    callback.training_bar.close()
            raise RunStopped(f"the training loss is {loss.detach().float().mean().item()} at step {step}; nothing "
                             f"of this step was applied and the checkpoints in {self.args.output_dir} are intact. "
                             f"Lower --learning_rate (or use --bf16 instead of --fp16) and resume with "
                             f"--resume_from_checkpoint last, or pass --nan_policy skip to drop such batches.")
        self.skipped_batches += 1
        logger.warning("non-finite loss at step %d: micro-batch skipped (%d so far)", step, self.skipped_batches)
        zero = no_gradient_loss(model.parameters())
        return (zero, result[1]) if return_outputs else zero

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with staged_checkpoint(run_dir, name, main=self.args.should_save, barrier=self.accelerator.wait_for_everyone,
                               save_total_limit=self.args.save_total_limit) as staged:
            self._get_output_dir = lambda trial=None: str(staged.folder.parent)  # Trainer writes (and rotates) there
            try:
                super()._save_checkpoint(model, trial)
            finally:
                del self._get_output_dir
            if self.state.best_model_checkpoint == str(staged.folder):
                self.state.best_model_checkpoint = str(staged.final)
                if self.args.should_save:
                    self.state.save_to_json(str(staged.folder / "trainer_state.json"))
            staged.keep = self.state.best_model_checkpoint

    # Checkpoint files: safetensors + JSON instead of Trainer's pickles (torch.save), with or without
    # DeepSpeed. Under DeepSpeed a checkpoint holds whole tensors by parameter name (gathered from
    # the ZeRO partitions) where the engine's own checkpoint would pickle one file per rank.

    def train(self, *args, **kwargs):
        with _whole_tensor_deepspeed_checkpoints():
            return super().train(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        # Trainer pickles the TrainingArguments next to the weights; run_config.json holds them as JSON.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir or self.args.output_dir, TRAINING_ARGS_NAME))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.is_deepspeed_enabled:
            return self._save_deepspeed_state(Path(output_dir))
        if not self.args.should_save:
            return None
        try:
            scheduler = json.dumps(self.lr_scheduler.state_dict())
            optimizer_state_to_files(self.optimizer.state_dict(), Path(output_dir))
        except TypeError as err:  # an optimizer/scheduler with state JSON cannot hold: Trainer's own files
            logger.warning("optimizer or scheduler state is not JSON-serialisable (%s): saved with torch.save", err)
            return super()._save_optimizer_and_scheduler(output_dir)
        Path(output_dir, SCHEDULER_JSON).write_text(scheduler, encoding="utf-8")
        return None

    def _save_deepspeed_state(self, folder: Path) -> None:
        """Trained fp32 masters, their optimizer state, the step count, the loss scale and the scheduler. All ranks
        gather.

        An optimizer whose state is not one value per weight element (Adafactor's factored moments, 8-bit
        states with their block scales) cannot be gathered per weight: each rank writes its torch optimizer's
        state as it holds it (safetensors + JSON), and the checkpoint resumes on as many ranks only.
        """
        from .distributed import (gather_optimizer_state, gather_weights, loss_scale_state, optimizer_state_problem,
                                  optimizer_step, rank_optimizer_state)

        model = self.accelerator.unwrap_model(self.model_wrapped)
        weights = gather_weights(model, self.optimizer)
        per_rank = optimizer_state_problem(self.optimizer) is not None
        if per_rank:
            folder.mkdir(parents=True, exist_ok=True)  # a rank may get here before rank 0 made the folder
            optimizer_state_to_files(rank_optimizer_state(self.optimizer), folder,
                                     RANK_OPTIMIZER.format(rank=self.args.process_index))
        else:
            state = gather_optimizer_state(model, self.optimizer)
        if self.args.should_save:
            save_file({name: tensor.contiguous().cpu() for name, tensor in weights.items()},
                      str(folder / TRAINED_WEIGHTS))
            if not per_rank:
                save_file({name: tensor.float().contiguous().cpu() for name, tensor in state.items()},
                          str(folder / OPTIMIZER_TENSORS))
            saved = {"step": optimizer_step(self.optimizer), "loss_scale": loss_scale_state(self.optimizer),
                     "per_rank_world_size": self.args.world_size if per_rank else None}
            (folder / OPTIMIZER_JSON).write_text(json.dumps(saved), encoding="utf-8")
            (folder / SCHEDULER_JSON).write_text(json.dumps(self.lr_scheduler.state_dict()), encoding="utf-8")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, TRAINED_WEIGHTS)):
            return self._load_deepspeed_state(Path(checkpoint))
        if checkpoint is None or self.is_deepspeed_enabled or not os.path.isfile(os.path.join(checkpoint,
                                                                                              OPTIMIZER_JSON)):
            return super()._load_optimizer_and_scheduler(checkpoint)  # DeepSpeed's, or a plain Trainer checkpoint
        self.optimizer.load_state_dict(optimizer_state_from_files(Path(checkpoint)))
        self.lr_scheduler.load_state_dict(json.loads(Path(checkpoint, SCHEDULER_JSON).read_text(encoding="utf-8")))

    def _load_deepspeed_state(self, checkpoint: Path) -> None:
        """What `_save_deepspeed_state` wrote, into this run's partitions (any number of ranks, or as many as
        wrote it where each rank saved its own optimizer state)."""
        from .distributed import (load_rank_optimizer_state, restore_loss_scale, restore_optimizer_state,
                                  restore_scheduler)

        model = self.accelerator.unwrap_model(self.model_wrapped)
        optimizer = json.loads((checkpoint / OPTIMIZER_JSON).read_text(encoding="utf-8"))
        world_size = optimizer.get("per_rank_world_size")
        if world_size is None:
            restore_optimizer_state(model, self.optimizer, load_file(str(checkpoint / OPTIMIZER_TENSORS)),
                                    optimizer["step"])
        elif world_size != self.args.world_size:
            raise UserError(f"--resume_from_checkpoint {checkpoint} holds the optimizer state of each of "
                            f"{world_size} ranks (its optimizer's state is not one value per weight); resume on "
                            f"{world_size} ranks with the same DeepSpeed config.")
        else:
            load_rank_optimizer_state(self.optimizer, optimizer_state_from_files(
                checkpoint, RANK_OPTIMIZER.format(rank=self.args.process_index)))
        restore_loss_scale(self.optimizer, optimizer.get("loss_scale"))
        restore_scheduler(self.lr_scheduler, json.loads((checkpoint / SCHEDULER_JSON).read_text(encoding="utf-8")))

    def _save_scaler(self, output_dir: str) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            Path(output_dir, SCALER_JSON).write_text(json.dumps(scaler.state_dict()), encoding="utf-8")

    def _load_scaler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, SCALER_JSON)):
            return super()._load_scaler(checkpoint)
        self.accelerator.scaler.load_state_dict(json.loads(Path(checkpoint, SCALER_JSON).read_text(encoding="utf-8")))

    def _save_rng_state(self, output_dir: str) -> None:
        os.makedirs(output_dir, exist_ok=True)  # a rank may get here before rank 0 made the folder
        save_rng_state(Path(output_dir, RNG_FILE.format(rank=self.args.process_index)))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        path = Path(checkpoint or "", RNG_FILE.format(rank=self.args.process_index))
        if checkpoint is None or not path.is_file():
            return super()._load_rng_state(checkpoint)
        restore_rng_state(path)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.skipped_batches:
            logs["skipped_batches"] = self.skipped_batches
        super().log(logs, *args, **kwargs)


class SupervisedTrainer(StageTrainer, Seq2SeqTrainer):
    """Seq2SeqTrainer for decoder-only models: generate from the prompt alone, return only new tokens."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        labels = inputs.pop("labels", None)  # the reference answer: never fed to generate()
        prompt_len = inputs["input_ids"].size(-1)
        _, generated, _ = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys, **gen_kwargs)
        generated = generated[:, prompt_len:] if generated is not None else None
        return None, generated, labels


class PairwiseTrainer(StageTrainer):
    """Reward-model trainer: loss -log sigmoid(r_chosen - r_rejected) over the pairs of a batch.

    r is the value head's score at each row's last real token: the one-label sequence
    classifier's own pooling (the last token that is not the pad id), so plain transformers
    and TRL's PPO score a saved reward model at the same place. Evaluation predictions are
    (n, 2) arrays of (chosen, rejected) scores; the label is the preferred column, always 0.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs, scaled for accumulation here

    def model_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scores = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        chosen, rejected = scores.squeeze(-1).float().chunk(2)
        loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
        return (loss, (chosen, rejected)) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, (chosen, rejected) = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), torch.stack((chosen, rejected), dim=-1), torch.zeros_like(chosen, dtype=torch.long)
