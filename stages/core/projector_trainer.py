"""The projector stage's training: DyPRAG's projector distilled from the bank LoRAs on a DeepSpeed engine.

The loop of its own (no HF Trainer: the trained module is the projector, the model stays frozen),
its data plan, optimizer, checkpoints and resume. Heavy imports stay inside the functions:
`stages.projector` imports `Pair` from here at the top.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .arguments import IGNORE_INDEX
from .checkpoint import restore_rng_state, save_rng_state, save_whole_tensors, staged_checkpoint
from .distributed import (gather_optimizer_state, gather_weights, local_device, restore_optimizer_state,
                          restore_scheduler, without_round_robin_gradients)
from .errors import RunStopped, UserError
from .stage import Run, finite_on_every_rank, no_gradient_loss

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# A checkpoint-N holds the projector (projector.safetensors + projector_config.json) and:
STATE_FILE = "trainer_state.json"  # step, epoch, the run's shape, scheduler, skipped micro-batches
OPTIMIZER_FILE = "optimizer.safetensors"  # the Adam moments, whole
RNG_FILE = "rng.safetensors"  # rank 0's random generators
LOSS_KEYS = ("loss", "lm_loss", "kl_loss", "mse_loss", "teacher_lm_loss")


@dataclass
class Pair:
    """One training text: a passage (whose bank LoRA is the teacher) and a QA text about it."""

    passage_id: str
    passage: list[int]  # the passage's tokens, as the projector reads them
    text: list[int]  # the QA training text
    answer_start: int  # first answer token of `text`: the answer objective scores text[answer_start:]


class Teachers:
    """The bank LoRAs of the training passages: copied into RAM once, or gathered from the memory-mapped bank."""

    def __init__(self, bank: Any, pairs: list[Pair], in_memory: bool) -> None:
        ids = sorted({p.passage_id for p in pairs})
        self.bank, self.row_of = bank, {pid: row for row, pid in enumerate(ids)}
        self.rows = bank.load(ids) if in_memory else None

    def __call__(self, batch: list[Pair], device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self.rows is None:
            return self.bank.load([p.passage_id for p in batch], device=device)
        rows = [self.row_of[p.passage_id] for p in batch]
        return {name: (a[rows].to(device), b[rows].to(device)) for name, (a, b) in self.rows.items()}


@dataclass
class Plan:
    """Which pairs every micro-batch of this rank holds, epoch by epoch, and the optimizer steps that makes.

    Each epoch deals the pairs to the ranks in a fresh order (seed + epoch); a tail of micro-batches
    that cannot fill a whole gradient accumulation is left out of the epoch. The order is a pure
    function of (seed, epoch, ranks), so a resumed run continues exactly where its checkpoint was.
    """

    sampler: Any  # torch DistributedSampler over the pair indices
    micro: int  # pairs per micro-batch
    accumulation: int  # micro-batches per optimizer step
    total_steps: int = 0

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil(len(self.sampler) / self.micro) // self.accumulation * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.micro_per_epoch // self.accumulation

    def micro_batches(self, start_step: int):
        """(epoch, last of its epoch?, pair indices) of every micro-batch after optimizer step `start_step`."""
        first_epoch = start_step // self.steps_per_epoch
        for epoch in range(first_epoch, math.ceil(self.total_steps / self.steps_per_epoch)):
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            skip = start_step * self.accumulation - epoch * self.micro_per_epoch if epoch == first_epoch else 0
            for index in range(skip, self.micro_per_epoch):
                yield epoch, index + 1 == self.micro_per_epoch, order[index * self.micro:(index + 1) * self.micro]


def engine_config(training_args: Any, model: Any, total_steps: int) -> dict[str, Any]:
    """The DeepSpeed config with every "auto" filled from the flags (ZeRO-0 without --deepspeed)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from .launching import ROOT

    ds_config = getattr(training_args, "hf_deepspeed_config", None)
    if ds_config is None:
        ds_config = HfTrainerDeepSpeedConfig(str(ROOT / "ds_configs" / "zero0.json"))
        ds_config.trainer_config_process(training_args)
    ds_config.trainer_config_finalize(training_args, model, total_steps)  # raises if an "auto" is left
    if "optimizer" in ds_config.config or "scheduler" in ds_config.config:
        raise UserError(f"--deepspeed {training_args.deepspeed}: projector builds its own optimizer and scheduler; "
                        f"remove the optimizer/scheduler sections (or use ds_configs/*.json).")
    # --bf16/--fp16 set the frozen model's compute dtype. The projector (a few % of the model's size)
    # trains in fp32: no mixed-precision wrapper in its engine, exact master weights in checkpoints.
    for precision in ("bf16", "fp16"):
        ds_config.config.setdefault(precision, {})["enabled"] = False
    without_round_robin_gradients(ds_config.config)  # checkpoints gather whole tensors
    return ds_config.config


def make_optimizer(params: list[torch.nn.Parameter], training_args: Any,
                   ds_config: dict[str, Any]) -> torch.optim.Optimizer:
    """torch AdamW; DeepSpeed's CPU Adam when the config offloads the optimizer (same update rule)."""
    import torch

    kwargs = {"lr": training_args.learning_rate, "betas": (training_args.adam_beta1, training_args.adam_beta2),
              "eps": training_args.adam_epsilon, "weight_decay": training_args.weight_decay}
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in ("none", None):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_engine(projector: Any, model: Any, training_args: Any, total_steps: int,
                 checkpoint: tuple[dict, dict, dict] | None) -> tuple[Any, Any]:
    """The DeepSpeed engine of the projector with its optimizer and schedule, restored from `checkpoint`."""
    from transformers import get_scheduler

    from .distributed import init_deepspeed_comm, init_single_process_env

    if checkpoint is not None:  # the module first: the engine builds its (partitioned) fp32 master from it
        projector.load_state_dict(checkpoint[0])
    init_single_process_env()
    init_deepspeed_comm()
    import deepspeed

    ds_config = engine_config(training_args, model, total_steps)
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        # The frozen model was loaded partitioned across the ranks (ZeRO-3): an engine without an
        # optimizer gives its modules the hooks that gather each layer's weights for the forward and
        # backward passes. The projector (a few % of the model's size) trains under ZeRO-2.
        deepspeed.initialize(model=model, config=copy.deepcopy(ds_config))
        ds_config["zero_optimization"]["stage"] = 2
        held = sum(param.ds_tensor.numel() for param in model.parameters())
        logger.info("frozen model partitioned (ZeRO-3): this rank holds %d of its %d weights", held,
                    sum(param.ds_numel for param in model.parameters()))
    optimizer = make_optimizer(list(projector.parameters()), training_args, ds_config)
    scheduler = get_scheduler(training_args.lr_scheduler_type, optimizer,
                              num_warmup_steps=training_args.get_warmup_steps(total_steps),
                              num_training_steps=total_steps)
    engine, *_ = deepspeed.initialize(model=projector, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if checkpoint is not None:
        _, moments, state = checkpoint
        restore_optimizer_state(engine.module, engine.optimizer, moments, state["global_step"])
        restore_scheduler(scheduler, state["scheduler"])
    return engine, scheduler


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Projector weights, Adam moments and trainer state of a checkpoint folder.

    The random generators (rank 0's, saved with the checkpoint) are restored here on every
    rank. The loop itself draws no random numbers (the pair order is a function of seed and
    epoch); the state is kept so that anything random added later resumes exactly too.
    """
    from safetensors.torch import load_file

    from dyprag.projector_model import WEIGHTS_FILE

    missing = [name for name in (WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE, RNG_FILE) if not (path / name).is_file()]
    if missing:
        raise UserError(f"--resume_from_checkpoint {path} lacks {', '.join(missing)}; give a checkpoint-N folder "
                        f"written by stages.projector.")
    restore_rng_state(path / RNG_FILE)
    return (load_file(str(path / WEIGHTS_FILE)), load_file(str(path / OPTIMIZER_FILE)),
            json.loads((path / STATE_FILE).read_text(encoding="utf-8")))


class ProjectorTrainer:
    """Trains `projector` on `pairs` against the frozen `model`, resuming from --resume_from_checkpoint.

    Per micro-batch (`dyprag.projector_model.distillation_losses`): the frozen model reads the passages,
    the projector turns them into LoRAs, and loss = LM + kl_weight * KL(teacher || student) + mse_weight *
    MSE(generated, bank A/B). A NaN/inf loss on any rank stops the run before the backward pass, or with
    --nan_policy skip adds no gradient and is counted. The loss terms go to trainer_log.jsonl (and W&B)
    every --logging_steps; a checkpoint-N is written every --save_steps and at the end of every epoch.
    """

    def __init__(self, projector: Any, model: Any, tokenizer: Any, bank: Any, pairs: list[Pair], args: Any,
                 run: Run) -> None:
        from torch.utils.data import DistributedSampler

        training_args = run.training_args
        self.projector, self.model, self.tokenizer, self.bank, self.pairs = projector, model, tokenizer, bank, pairs
        self.args, self.run, self.device = args, run, local_device()
        self.plan = Plan(DistributedSampler(range(len(pairs)), num_replicas=run.world, rank=run.rank,
                                            seed=training_args.seed),
                         training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps)
        if self.plan.steps_per_epoch == 0:
            raise UserError(f"{len(pairs)} pairs on {run.world} rank(s) fill no optimizer step of "
                            f"per_device_train_batch_size {self.plan.micro} x gradient_accumulation_steps "
                            f"{self.plan.accumulation}; lower them.")
        self.plan.total_steps = (training_args.max_steps if training_args.max_steps > 0
                                 else math.ceil(training_args.num_train_epochs * self.plan.steps_per_epoch))
        resume = training_args.resume_from_checkpoint
        checkpoint = load_checkpoint(Path(resume)) if resume else None
        self.engine, self.scheduler = build_engine(projector, model, training_args, self.plan.total_steps, checkpoint)
        state = checkpoint[2] if checkpoint else {}
        self.step = state.get("global_step", 0)
        self.skipped = state.get("skipped_batches", 0)  # absent in checkpoints of older runs
        if checkpoint and (state["world_size"], state["steps_per_epoch"]) != (run.world, self.plan.steps_per_epoch):
            logger.warning("resuming %s with other ranks or batch sizes than it was saved with: the weights and "
                           "optimizer continue exactly, the remaining pairs of the epoch are dealt anew.", resume)
        self.teachers = Teachers(bank, pairs, args.bank_in_memory)
        self.started, self.samples = time.time(), 0

    def train(self) -> None:
        """The optimizer steps from the checkpoint's (or the first) to the plan's last."""
        import torch
        from tqdm.auto import tqdm

        plan, training_args = self.plan, self.run.training_args
        every_save = (math.ceil(training_args.save_steps * plan.total_steps) if training_args.save_steps < 1
                      else int(training_args.save_steps))
        sums, counted = torch.zeros(len(LOSS_KEYS), device=self.device), 0
        progress = tqdm(total=plan.total_steps, initial=self.step, desc="projector", unit="step",
                        disable=self.run.rank != 0)
        with progress:  # closed before a stop's message, so the bar's last line comes first
            for epoch, epoch_end, indices in plan.micro_batches(self.step):
                sums += self._micro_batch([self.pairs[i] for i in indices])
                counted += 1
                if counted % plan.accumulation:
                    continue
                self.step += 1
                progress.update(1)
                if self.step % max(int(training_args.logging_steps), 1) == 0 or self.step == plan.total_steps:
                    self._log(sums, counted)
                    sums.zero_()
                    counted = 0
                if training_args.save_strategy != "no" and (self.step % every_save == 0 or epoch_end
                                                            or self.step == plan.total_steps):
                    self.save_checkpoint(epoch)
                if self.step >= plan.total_steps:
                    break

    def _micro_batch(self, batch: list[Pair]) -> torch.Tensor:
        """Forward and backward of one micro-batch; its loss terms (zeros where skipped), in LOSS_KEYS order."""
        import torch

        from dyprag.padding import pad_rows
        from dyprag.projector_model import distillation_losses, passage_hidden

        config, pad, whole_text = self.projector.config, self.tokenizer.pad_token_id, self.args.objective == "original"
        hidden = passage_hidden(self.model, [p.passage for p in batch], pad, config.pooling)
        input_ids = pad_rows([p.text for p in batch], pad).to(self.device)
        scored = [0 if whole_text else p.answer_start for p in batch]  # original: LM and KL over the whole text
        labels = pad_rows([[IGNORE_INDEX] * start + p.text[start:] for p, start in zip(batch, scored)],
                           IGNORE_INDEX).to(self.device)
        terms = distillation_losses(self.model, self.engine(hidden), self.teachers(batch, self.device),
                                    self.bank.spec.scaling, input_ids, labels, student_scaling=config.spec.scaling,
                                    kl_per_text=whole_text)
        loss = terms["lm"] + self.args.kl_weight * terms["kl"] + self.args.mse_weight * terms["mse"]
        values = torch.stack([loss.detach(), *(terms[k].detach() for k in ("lm", "kl", "mse", "teacher_lm"))])
        if not finite_on_every_rank(loss, self.run.world):  # checked before backward/step: nothing of it is applied
            value = loss.detach().float().item()
            what = (f"the training loss is {value}" if not math.isfinite(value)
                    else "another rank's training loss is NaN/inf")
            if self.run.run_args.nan_policy == "stop":
                raise RunStopped(f"{what} at step {self.step + 1}; nothing of this step was applied and the "
                                 f"checkpoints in {self.run.output_dir} are intact. Lower --learning_rate and resume "
                                 f"with --resume_from_checkpoint last, or pass --nan_policy skip to drop such "
                                 f"micro-batches.")
            self.skipped += 1
            logger.warning("%s at step %d: micro-batch skipped (%d so far)", what, self.step + 1, self.skipped)
            loss = no_gradient_loss(self.engine.module.parameters())  # counts 0 in the logged means
            values = torch.zeros_like(values)
        self.engine.backward(loss)
        self.engine.step()  # DeepSpeed updates at the accumulation boundary only
        self.samples += len(batch) * self.run.world
        return values

    def _log(self, sums: torch.Tensor, counted: int) -> None:
        """One trainer_log.jsonl row (and W&B): the means of the loss terms of every rank's `counted` micro-batches
        since the last row, whose sums on this rank are `sums` (summed over the ranks in place)."""
        import torch

        from .callbacks import log_step

        if self.run.world > 1:
            torch.distributed.all_reduce(sums)
        means = (sums / (counted * self.run.world)).tolist()
        if self.run.rank == 0:
            log_step(self.run.output_dir, self.run.stage,
                     {"step": self.step, "epoch": round(self.step / self.plan.steps_per_epoch, 4),
                      **dict(zip(LOSS_KEYS, means)), "learning_rate": self.scheduler.get_last_lr()[0],
                      "samples_per_second": self.samples / (time.time() - self.started),
                      **({"skipped_batches": self.skipped} if self.skipped else {})})

    def _barrier(self) -> None:
        if self.run.world > 1:
            import torch

            torch.distributed.barrier()

    def save_checkpoint(self, epoch: int) -> None:
        """output_dir/checkpoint-<step>: projector weights + config, Adam moments (whole tensors, gathered from the
        ZeRO partitions: a run resumes on any number of ranks), trainer state, rank 0's random generators."""
        from dyprag.projector_model import save_projector

        main = self.run.rank == 0
        state = {"global_step": self.step, "epoch": epoch, "steps_per_epoch": self.plan.steps_per_epoch,
                 "world_size": self.run.world, "scheduler": self.scheduler.state_dict(),
                 "skipped_batches": self.skipped}
        with staged_checkpoint(self.run.output_dir, f"checkpoint-{self.step}", main=main, barrier=self._barrier,
                               save_total_limit=self.run.training_args.save_total_limit) as staged:
            # collective: every rank takes part
            weights = gather_weights(self.engine.module, self.engine.optimizer)
            moments = gather_optimizer_state(self.engine.module, self.engine.optimizer)
            if main:
                save_projector(self.projector, staged.folder, state=weights)
                save_whole_tensors(moments, staged.folder / OPTIMIZER_FILE)
                save_rng_state(staged.folder / RNG_FILE)
                (staged.folder / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        if main:
            logger.info("saved %s", staged.final)

    def save(self) -> None:
        """The trained projector (fp32 master weights, whole) + its config into output_dir; the loss plots."""
        from dyprag.projector_model import save_projector

        from .callbacks import plot_loss

        weights = gather_weights(self.engine.module, self.engine.optimizer)
        if self.run.rank == 0:
            save_projector(self.projector, self.run.output_dir, state=weights)
            logger.info("projector saved to %s after %d steps", self.run.output_dir, self.step)
            if self.run.run_args.plot_loss:
                plot_loss(self.run.output_dir, keys=LOSS_KEYS)
            wandb = sys.modules.get("wandb")
            if wandb is not None and wandb.run is not None:
                wandb.finish()
        self._barrier()
