"""projector: train DyPRAG's parameter projector on (passage, its PRAG LoRA, a QA text about it).

    python -m stages.projector --model_name_or_path M --data_file records.json --bank_dir BANK --output_dir OUT
    deepspeed launch/projector.sh --model_name_or_path M --data_file records.json --bank_dir BANK --output_dir OUT
    bash launch/projector.sh ...   # the same through the launcher (NPROC_PER_NODE ranks)

Training pairs come from part 1's outputs: the PRAG records (`--data_file`, the file that
`stages.encode` encoded) and their LoRA bank (`--bank_dir`, keys "<test_id>_<pid>"). Every
QA pair of a passage's augmentation (`<model>_qa`) is one pair (`--qa_pairs first`: its first
only); a record without augmentation pairs its own question and first answer with its first
passage (the gold / top-1 one). The QA text is the original prompt + "The answer is <answer>."
(`dyprag.prompts`; `--with_cot`: the chain-of-thought prompt and the QA's full_answer), with the
question alone by default (the prompt DyPRAG answers at test time) or the passage in context
(`--qa_with_passage`). The original's texts are `--qa_pairs first --qa_with_passage true`, with
`--with_cot --fewshot_file F` for 2WikiMultihopQA and HotpotQA.

Per step (`dyprag.projector_model.distillation_losses`): the frozen model reads each passage (last
layer, pooled), the projector turns it into a LoRA, and
    loss = LM(student) + kl_weight * KL(teacher || student) + mse_weight * MSE(generated, real A/B)
where student = model + generated LoRA and teacher = model + the passage's bank LoRA, each
injected per sample (`inject_lora`). `--objective answer` (default): LM and KL are means over
the answer tokens, and both LoRAs are scaled by alpha/r. `--objective original` (train_dyprag.py):
LM is the mean over every token of the text, KL the sum over each text's tokens (its `batchmean`
at batch 1), and the student's LoRA is injected unscaled (B @ A) against the teacher's alpha/r
(the projector is then saved with alpha = r, so it is injected unscaled at inference too).
Padding never counts in either (the original pads every text to 3000 tokens and sums the KL of
the pads too).
The bank rows of all training passages are read into memory once (`--bank_in_memory`).

The projector is the only trainable module and the only one DeepSpeed trains (ZeRO-0/1/2,
"auto" values resolved from the flags before `deepspeed.initialize`); the base model stays
frozen in the compute dtype (--bf16/--fp16), optionally 4/8-bit (`--quantization_bit`), and
with a ZeRO-3 config partitioned across the ranks (loaded so, gathered layer by layer by an
engine of its own without an optimizer; the projector then trains under ZeRO-2). The
projector itself trains in fp32. Without a launcher the run is a world of one (ZeRO-0 unless
--deepspeed names a config).

Output: OUT/projector.safetensors + projector_config.json (load with
`dyprag.projector_model.load_projector`; `stages.prag_eval --projector_dir OUT` evaluates it,
`stages.projector_export` writes generated adapters), run_config.json, trainer_log.jsonl (every
loss term per step; W&B with --report_to wandb), and OUT/checkpoint-<step>/ every
--save_steps and at the end of every epoch: projector weights + config, Adam moments
(safetensors), trainer_state.json (step, scheduler, data position), rng.safetensors.
Checkpoints hold whole tensors (gathered from the ZeRO partitions), so a run resumes on any
number of ranks: --resume_from_checkpoint OUT/checkpoint-N, or `auto` for the latest. A
checkpoint is written as OUT/.checkpoint-N.tmp and renamed whole, so `auto` never takes a
half-written one.

A NaN/inf loss on any rank stops the run before that micro-batch's backward pass (every rank
agrees, the checkpoints stay intact); with --nan_policy skip the micro-batch adds no gradient,
counts 0 in the logged losses, and `skipped_batches` in trainer_log.jsonl counts it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from transformers import TrainingArguments

from .core.stage import finite_on_every_rank, no_gradient_loss, restore_rng_state, save_rng_state
from .core.distributed import (gather_optimizer_state, gather_weights, restore_optimizer_state, restore_scheduler,
                              without_round_robin_gradients)
from .core.errors import RunStopped, UserError, main_guard

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

STAGE = "projector"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
LOSS_KEYS = ("loss", "lm_loss", "kl_loss", "mse_loss", "teacher_lm_loss")


@dataclass
class ProjectorArguments:
    data_file: str | None = field(default=None, metadata={"help": "PRAG records whose passages are in the bank (the "
                                                                  "--input_file stages.encode read)."})
    bank_dir: str | None = field(default=None, metadata={"help": "LoRA bank of those passages (stages.encode's "
                                                                 "output_dir): the teachers and MSE targets."})
    split: str | None = field(default=None, metadata={"help": "Train only on records whose 'split' field has this "
                                                              "value (e.g. train for the embedded demo_qa)."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N records (after --split)."})
    augment_model_name: str | None = field(default=None, metadata={"help": "Prefix of the augmentation fields "
                                                                           "(default: detected from the records)."})
    qa_with_passage: bool = field(default=False, metadata={"help": "Put the passage in the QA text's context (the "
                                                                   "original's first PRAG text); default: the "
                                                                   "question alone, as DyPRAG is asked."})
    qa_pairs: Literal["all", "first"] = field(
        default="all", metadata={"help": "QA pairs of a passage's augmentation that become training texts: all, or "
                                         "the first (the original: one text per passage)."})
    with_cot: bool = field(default=False, metadata={"help": "Chain-of-thought QA texts: the few-shot prompt and the "
                                                            "QA's full_answer (needs --fewshot_file), as the original "
                                                            "for 2WikiMultihopQA and HotpotQA."})
    fewshot_file: str | None = field(default=None, metadata={"help": "JSON list of {question, answer} examples for "
                                                                     "the chain-of-thought prompt."})
    objective: Literal["answer", "original"] = field(
        default="answer", metadata={"help": "answer: LM and KL over the answer tokens, each a mean per token, the "
                                            "student's LoRA scaled by alpha/r as the teacher's; original: DyPRAG's "
                                            "train_dyprag.py: LM over every token of the text, KL summed over each "
                                            "text's tokens, the student's LoRA unscaled (B@A, and so at inference). "
                                            "Padding never counts in either."})
    projector_p: int = field(default=32, metadata={"help": "Hidden width p of each (layer, module) MLP (the "
                                                           "original: 32)."})
    pooling: Literal["last", "mean"] = field(default="last", metadata={"help": "Passage state fed to the projector: "
                                                                              "the last token's (the original) or "
                                                                              "the mean over its tokens."})
    max_passage_length: int = field(default=512, metadata={"help": "Passage tokens the frozen model reads (longer "
                                                                   "passages are cut); kept in the projector "
                                                                   "config for inference."})
    cutoff_len: int = field(default=3000, metadata={"help": "Longest QA text in tokens; longer pairs are dropped and "
                                                            "counted (the original: 3000)."})
    kl_weight: float = field(default=0.01, metadata={"help": "Weight of KL(teacher || student) (the original: 0.01)."})
    mse_weight: float = field(default=100.0, metadata={"help": "Weight of the MSE between generated and bank A/B "
                                                               "(the original: 100)."})
    bank_in_memory: bool = field(default=True, metadata={"help": "Copy the training passages' bank LoRAs into RAM "
                                                                 "once; false: gather them per step from the "
                                                                 "memory-mapped bank (for banks larger than RAM)."})

    def __post_init__(self) -> None:
        if not self.data_file:
            raise UserError("--data_file is required: the PRAG records whose passages stages.encode put in the bank.")
        if not self.bank_dir:
            raise UserError("--bank_dir is required: the LoRA bank written by stages.encode.")
        for name in ("projector_p", "max_passage_length", "cutoff_len"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.with_cot and not self.fewshot_file:
            raise UserError("--with_cot needs --fewshot_file: a JSON list of {question, answer} examples whose "
                            "answers end with 'So the answer is ...'.")
        if self.kl_weight < 0 or self.mse_weight < 0:
            raise UserError(f"--kl_weight and --mse_weight must be >= 0, got {self.kl_weight} and {self.mse_weight}.")


@dataclass
class ProjectorTrainingArguments(TrainingArguments):
    """TrainingArguments with the original DyPRAG defaults (torch AdamW, constant lr, no clipping)."""

    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate of the projector (the "
                                                                 "original: 1e-5)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training pairs (the original: "
                                                                   "1)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Pairs per rank and micro-step, padded to "
                                                                          "the longest in the batch (the original: "
                                                                          "1)."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (torch's default, which the "
                                                                "original uses)."})
    lr_scheduler_type: str = field(default="constant", metadata={"help": "Learning-rate schedule (transformers "
                                                                         "names; the original: constant)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm (0: none, as the "
                                                                "original)."})
    logging_steps: float = field(default=1, metadata={"help": "Write the loss terms every N optimizer steps."})


@dataclass
class Pair:
    passage_id: str
    passage: list[int]  # the passage's tokens, as the projector reads them
    text: list[int]  # the QA training text
    answer_start: int  # first answer token of `text`: the answer objective scores text[answer_start:]


def build_pairs(records: list[dict[str, Any]], augment_name: str | None, tokenizer: Any,
                args: ProjectorArguments, fewshot: str | None = None) -> tuple[list[Pair], int]:
    """The training pairs of the records (see the module docstring) and how many were too long."""
    from dyprag.records import passage_id
    from dyprag.projector_model import qa_text, tokenize_passages

    from .encode import collect_passages

    answer_key = "full_answer" if args.with_cot else "answer"
    pairs, too_long = [], 0
    for record in records:
        first = passage_id(record["test_id"], 0)
        for passage in collect_passages([record], augment_name):
            qas = [(qa["question"], str(qa[answer_key])) for qa in passage.qas
                   if qa.get("question") and qa.get(answer_key)]
            if not qas and passage.id == first and record["answer"] and not args.with_cot:
                qas = [(record["question"], record["answer"][0])]
            if args.qa_pairs == "first":
                qas = qas[:1]
            tokens = tokenize_passages(tokenizer, [passage.text], args.max_passage_length)[0]
            for question, answer in qas:
                text, start = qa_text(tokenizer, question, answer, [passage.text] if args.qa_with_passage else None,
                                      args.with_cot, fewshot)
                if len(text) > args.cutoff_len or start >= len(text):
                    too_long += 1
                    continue
                pairs.append(Pair(passage.id, tokens, text, start))
    return pairs, too_long


# ------------------------------------------------------------------------- DeepSpeed engine

def engine_config(training_args: ProjectorTrainingArguments, model: Any, total_steps: int) -> dict[str, Any]:
    """The DeepSpeed config with every "auto" filled from the flags (ZeRO-0 without --deepspeed)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from .core.launching import ROOT

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


def make_optimizer(params: list[torch.nn.Parameter], training_args: ProjectorTrainingArguments,
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


# ------------------------------------------------------------------------------ checkpoints

def save_checkpoint(out: Path, step: int, engine: Any, projector: Any, trainer_state: dict[str, Any],
                    rank: int, save_total_limit: int | None) -> Path | None:
    """OUT/checkpoint-<step>: written by rank 0 into a temporary folder, then renamed (atomic)."""
    from safetensors.torch import save_file

    from dyprag.projector_model import save_projector

    # collective: every rank takes part
    weights = gather_weights(engine.module, engine.optimizer)
    moments = gather_optimizer_state(engine.module, engine.optimizer)
    final = out / f"checkpoint-{step}"
    if rank != 0 or final.exists():
        return None
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed while saving
    save_projector(projector, tmp, state=weights)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in moments.items()}, str(tmp / OPTIMIZER_FILE))
    save_rng_state(tmp / RNG_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2), encoding="utf-8")
    os.replace(tmp, final)
    logger.info("saved %s", final)
    if save_total_limit:
        from transformers.trainer_utils import sort_checkpoints

        for old in sort_checkpoints(str(out))[:-save_total_limit]:
            shutil.rmtree(old)
    return final


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


# ------------------------------------------------------------------------------------ stage

def load_pairs(proj_args: ProjectorArguments, tokenizer: Any) -> tuple[list[Pair], Any]:
    """The training pairs whose passage has a bank LoRA, and the bank."""
    from dyprag.bank import LoraBank, LoraBankError
    from dyprag.records import RecordError, detect_augment_model, load_records

    try:
        records = load_records(proj_args.data_file)
    except RecordError as err:
        raise UserError(f"--data_file: {err}") from None
    if proj_args.split is not None:
        records = [r for r in records if r.get("split") == proj_args.split]
        if not records:
            raise UserError(f"--data_file {proj_args.data_file} holds no record with split {proj_args.split!r}; "
                            f"pick a --split its records have, or drop the flag.")
    records = records[: proj_args.max_samples]
    try:
        has_augment = any(r.get("augment") for r in records)
        augment_name = proj_args.augment_model_name or (detect_augment_model(records) if has_augment else None)
    except RecordError as err:
        raise UserError(f"--data_file: {err}") from None
    try:
        bank = LoraBank(proj_args.bank_dir)
    except LoraBankError as err:
        raise UserError(f"--bank_dir: {err}") from None
    from .prag_eval import _read_fewshot

    fewshot = _read_fewshot(proj_args.fewshot_file) if proj_args.with_cot else None
    pairs, too_long = build_pairs(records, augment_name, tokenizer, proj_args, fewshot)
    without_lora = sum(1 for p in pairs if p.passage_id not in bank)
    pairs = [p for p in pairs if p.passage_id in bank]
    if not pairs:
        if without_lora:
            reason = (f"no passage of its {without_lora} QA pairs has a LoRA in --bank_dir {proj_args.bank_dir}; "
                      f"encode these records first (python -m stages.encode)")
        elif too_long:
            reason = (f"all {too_long} QA pairs are longer than --cutoff_len {proj_args.cutoff_len} tokens and were "
                      f"dropped; raise --cutoff_len")
        else:
            reason = "its records have no QA pair (augmentation or a question with an answer)"
        raise UserError(f"no training pairs in --data_file {proj_args.data_file}: {reason}.")
    try:  # the teachers' shards are read before any training step: a corrupt one fails now
        bank.check([p.passage_id for p in pairs])
    except LoraBankError as err:
        raise UserError(f"--bank_dir: {err}") from None
    logger.info("%d training pairs (dropped: %d longer than --cutoff_len, %d without a bank LoRA)", len(pairs),
                too_long, without_lora)
    return pairs, bank


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


def build_engine(projector: Any, model: Any, training_args: ProjectorTrainingArguments, total_steps: int,
                 checkpoint: tuple[dict, dict, dict] | None) -> tuple[Any, Any]:
    """The DeepSpeed engine of the projector with its optimizer and schedule, restored from `checkpoint`."""
    from transformers import get_scheduler

    from .core.distributed import init_deepspeed_comm, init_single_process_env

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


def run_projector(argv: list[str] | None = None) -> None:
    import torch
    from torch.utils.data import DistributedSampler
    from tqdm.auto import tqdm
    from transformers import set_seed

    from dyprag.lora import LoraSpec
    from dyprag.projector_model import Projector, ProjectorConfig, distillation_losses, pad_right, \
        passage_hidden, save_projector

    from .core.callbacks import init_wandb, log_step, plot_loss
    from .core.stage import prepare_output_dir, resolved_config, save_config
    from .core.distributed import zero_stage
    from .core.arguments import FinetuningArguments, ModelArguments, RunArguments, parse_args
    from .core.loader import check_model_args, get_compute_dtype, load_model, load_tokenizer
    from .core.distributed import local_device

    # 1. arguments and checks (before anything is loaded)
    model_args, proj_args, training_args, run_args = parse_args(
        [ModelArguments, ProjectorArguments, ProjectorTrainingArguments, RunArguments], argv, STAGE)
    finetuning_args = FinetuningArguments()  # the base stays frozen; adapters given with the model are merged
    stage = zero_stage(training_args.deepspeed)
    check_model_args(model_args, finetuning_args, stage)
    zero3 = stage == 3  # the frozen model partitioned across the ranks
    if training_args.resume_from_checkpoint == "auto":
        training_args.resume_from_checkpoint = "last"
    training_args.do_train = True  # projector only trains (no --do_train needed)
    rank, world = training_args.process_index, training_args.world_size  # sets up the ranks under the launcher
    prepare_output_dir(training_args, run_args)
    out = Path(training_args.output_dir)
    config = resolved_config(STAGE, model_args, proj_args, training_args, run_args)
    save_config(str(out), config)

    # 2. training pairs; the frozen model in the compute dtype on this rank's device; the teachers
    tokenizer = load_tokenizer(model_args)
    pairs, bank = load_pairs(proj_args, tokenizer)
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=False,
                       compute_dtype=get_compute_dtype(training_args.bf16, training_args.fp16))
    device = local_device()
    if model_args.quantization_bit is None and not zero3:  # ZeRO-3's engine places the partitions itself
        model.to(device)
    teachers = Teachers(bank, pairs, proj_args.bank_in_memory)

    # 3. the projector (seeded: the same on every rank), the data plan, the DeepSpeed engine
    set_seed(training_args.seed)
    # The original objective injects the student's LoRA unscaled: its spec then has alpha = r, so
    # inference (prag_eval, projector_export) injects it as it was trained.
    spec = bank.spec if proj_args.objective == "answer" else LoraSpec(rank=bank.spec.rank, alpha=bank.spec.rank,
                                                                       target_modules=bank.spec.target_modules)
    try:
        projector_config = ProjectorConfig.for_model(
            model, spec, projector_p=proj_args.projector_p, pooling=proj_args.pooling,
            max_passage_length=proj_args.max_passage_length, base_model_name_or_path=model_args.model_name_or_path)
    except ValueError as err:
        raise UserError(f"--bank_dir {proj_args.bank_dir}: {err}") from None
    if set(projector_config.modules) != set(bank.modules):
        raise UserError(f"--bank_dir {proj_args.bank_dir} holds LoRAs for other modules than this model's "
                        f"{', '.join(bank.spec.target_modules)}; encode with --model_name_or_path "
                        f"{model_args.model_name_or_path}.")
    projector = Projector(projector_config)
    plan = Plan(DistributedSampler(range(len(pairs)), num_replicas=world, rank=rank, seed=training_args.seed),
                training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps)
    if plan.steps_per_epoch == 0:
        raise UserError(f"{len(pairs)} pairs on {world} rank(s) fill no optimizer step of per_device_train_batch_size "
                        f"{plan.micro} x gradient_accumulation_steps {plan.accumulation}; lower them.")
    plan.total_steps = (training_args.max_steps if training_args.max_steps > 0
                        else math.ceil(training_args.num_train_epochs * plan.steps_per_epoch))
    resume = training_args.resume_from_checkpoint
    checkpoint = load_checkpoint(Path(resume)) if resume else None
    engine, scheduler = build_engine(projector, model, training_args, plan.total_steps, checkpoint)
    start_step = checkpoint[2]["global_step"] if checkpoint else 0
    if checkpoint and (checkpoint[2]["world_size"], checkpoint[2]["steps_per_epoch"]) != (world, plan.steps_per_epoch):
        logger.warning("resuming %s with other ranks or batch sizes than it was saved with: the weights and optimizer "
                       "continue exactly, the remaining pairs of the epoch are dealt anew.", resume)

    # 4. train: per micro-batch, the passages through the frozen model and the projector, teacher and student
    init_wandb(STAGE, training_args, run_args, config)
    every_save = (math.ceil(training_args.save_steps * plan.total_steps) if training_args.save_steps < 1
                  else int(training_args.save_steps))
    step, sums, counted, started, samples = start_step, torch.zeros(len(LOSS_KEYS), device=device), 0, time.time(), 0
    skipped = checkpoint[2].get("skipped_batches", 0) if checkpoint else 0  # absent in checkpoints of older runs
    whole_text = proj_args.objective == "original"  # LM and KL over every token of the text
    progress = tqdm(total=plan.total_steps, initial=start_step, desc="projector", unit="step", disable=rank != 0)
    for epoch, epoch_end, indices in plan.micro_batches(start_step):
        batch = [pairs[i] for i in indices]
        hidden = passage_hidden(model, [p.passage for p in batch], tokenizer.pad_token_id, projector_config.pooling)
        input_ids = pad_right([p.text for p in batch], tokenizer.pad_token_id).to(device)
        scored = [0 if whole_text else p.answer_start for p in batch]
        labels = pad_right([[-100] * start + p.text[start:] for p, start in zip(batch, scored)], -100).to(device)
        terms = distillation_losses(model, engine(hidden), teachers(batch, device), bank.spec.scaling, input_ids,
                                    labels, student_scaling=projector_config.spec.scaling, kl_per_text=whole_text)
        loss = terms["lm"] + proj_args.kl_weight * terms["kl"] + proj_args.mse_weight * terms["mse"]
        values = torch.stack([loss.detach(), *(terms[k].detach() for k in ("lm", "kl", "mse", "teacher_lm"))])
        if not finite_on_every_rank(loss, world):  # checked before backward/step: nothing of it is applied
            value = loss.detach().float().item()
            what = (f"the training loss is {value}" if not math.isfinite(value)
                    else "another rank's training loss is NaN/inf")
            if run_args.nan_policy == "stop":
                progress.close()  # the bar's last line before the message
                raise RunStopped(f"{what} at step {step + 1}; nothing of this step was applied and the checkpoints "
                                 f"in {out} are intact. Lower --learning_rate and resume with "
                                 f"--resume_from_checkpoint auto, or pass --nan_policy skip to drop such "
                                 f"micro-batches.")
            skipped += 1
            logger.warning("%s at step %d: micro-batch skipped (%d so far)", what, step + 1, skipped)
            loss = no_gradient_loss(engine.module.parameters())  # counts 0 in the logged means
            values = torch.zeros_like(values)
        engine.backward(loss)
        engine.step()  # DeepSpeed updates at the accumulation boundary only
        sums += values
        counted, samples = counted + 1, samples + len(batch) * world
        if counted % plan.accumulation:
            continue
        step += 1
        progress.update(1)
        if step % max(int(training_args.logging_steps), 1) == 0 or step == plan.total_steps:
            if world > 1:
                torch.distributed.all_reduce(sums)
            means = (sums / (counted * world)).tolist()  # every rank's micro-batches since the last log
            if rank == 0:
                log_step(out, STAGE, {"step": step, "epoch": round(step / plan.steps_per_epoch, 4),
                                      **dict(zip(LOSS_KEYS, means)), "learning_rate": scheduler.get_last_lr()[0],
                                      "samples_per_second": samples / (time.time() - started),
                                      **({"skipped_batches": skipped} if skipped else {})})
            sums.zero_()
            counted = 0
        if training_args.save_strategy != "no" and (step % every_save == 0 or epoch_end or step == plan.total_steps):
            save_checkpoint(out, step, engine, projector,
                            {"global_step": step, "epoch": epoch, "steps_per_epoch": plan.steps_per_epoch,
                             "world_size": world, "scheduler": scheduler.state_dict(), "skipped_batches": skipped},
                            rank, training_args.save_total_limit)
        if step >= plan.total_steps:
            break
    progress.close()

    # 5. the trained projector (fp32 master weights, whole) + its config, the loss plots
    weights = gather_weights(engine.module, engine.optimizer)
    if rank == 0:
        save_projector(projector, out, state=weights)
        logger.info("projector saved to %s after %d steps", out, step)
        if run_args.plot_loss:
            plot_loss(out, keys=LOSS_KEYS)
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()
    if world > 1:
        torch.distributed.barrier()


main = main_guard(run_projector)

if __name__ == "__main__":
    main()
