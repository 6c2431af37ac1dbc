"""sft training throughput: our stages.sft code path against a plain transformers.Trainer script.

    python bench/sft_throughput.py [--work_dir /tmp/sft_bench] [--steps 6] [--repeats 3] ...

Both sides train the same ~20M-parameter model (`python -m stages.world --preset bench`,
built once into --work_dir) on the same alpaca-like data (../shared/data/llamafactory_demo/
alpaca_en_demo.json when present, else the embedded demo_sft), full fine-tuning, AdamW, the
same batch size, learning rate, seed, thread count and dtype (fp32, or bf16 = CPU autocast
over fp32 master weights, as `--bf16` gives).

How it measures, and why this is fair:
- Everything runs in this one process, so both sides share interpreter, allocator and
  threads. Each run builds its trainer from scratch (fresh weights from disk, fresh optimizer)
  and trains `warmup + steps` optimizer steps; only the last `steps` are timed (a callback
  stamps the end of every step), so model loading, tokenization (cached by `datasets`),
  trainer set-up and the first slow steps (allocator growth, kernel selection) are excluded
  on both sides alike. Collation is inside the timed window, because it is part of the path.
- Tokens are counted by a thin wrapper around each side's collator: the real (non-padding)
  tokens of every batch, i.e. the sum of the unpadded row lengths. The i-th collated batch is
  the i-th step's batch (gradient accumulation 1, prefetch does not reorder), so tokens of
  the timed steps / their wall time is exact.
- Our side is the code `python -m stages.sft` runs, assembled the same way in process:
  `stages.core.data.get_dataset` with `supervised` / `packed_supervised`, `stages.core.loader.load_model`
  (finetuning_type full), `SupervisedCollator` and `SupervisedTrainer`. A subprocess per run
  would add seconds of process start-up that the plain side would have to pay too and that
  `train_runtime` mixes with set-up; stamping steps in process measures the training loop only.
- The plain side is what a user writes with transformers alone: the chat template through
  `apply_chat_template`, labels -100 on the prompt, `DataCollatorForSeq2Seq` (its default
  padding: to the longest row), `AutoModelForCausalLM`, `Trainer`. Same rows, same sampler
  seed, so without packing both sides see the same samples in the same order.
- Runs alternate (the order of the configurations is reversed on every other repeat) and
  each figure is the median over `--repeats` runs.

Columns: see bench/README.md. MFU = 6 * N * tokens/s / peak, with N the parameters of the
linear layers (lm_head included, embedding lookups excluded); attention scores (QK^T, AV)
are left out (a few percent at these lengths). The peak is measured here: the best of ten
2048^3 bf16 products through `F.linear` (the kernel of nn.Linear) on this CPU; the "own%" column
divides by the same peak in the row's own dtype.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ALPACA = ROOT.parent / "shared" / "data" / "llamafactory_demo" / "alpaca_en_demo.json"


@dataclass
class Run:
    """What one training run measured (timed steps only)."""

    tokens: int = 0  # real tokens of the timed steps
    padded: int = 0  # tokens incl. padding of the timed steps
    samples: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Counter:
    """Wraps a collator; records real tokens, padded tokens and samples of every batch in order."""

    collate: Callable
    batches: list[tuple[int, int, int]] = field(default_factory=list)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(features)
        real = sum(len(f["input_ids"]) for f in features)
        samples = sum(max(f["segment_ids"]) if "segment_ids" in f else 1 for f in features)
        self.batches.append((real, batch["input_ids"].numel(), samples))
        return batch


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    return StepTimer()


def training_args(cfg: argparse.Namespace, bf16: bool, ours: bool):
    from transformers import Seq2SeqTrainingArguments

    # Identical for both sides; stages.sft additionally keeps unused columns (segment_ids).
    return Seq2SeqTrainingArguments(
        output_dir=str(cfg.work_dir / "runs"), per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.warmup + cfg.steps, learning_rate=1e-5, optim="adamw_torch", lr_scheduler_type="constant",
        bf16=bf16, use_cpu=True, seed=42, logging_steps=10**6, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=not ours)


def measure(trainer, counter: Counter, timer, cfg: argparse.Namespace) -> Run:
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints the train metrics dict of every run
    trainer.train()
    stamps, batches = timer.stamps, counter.batches[: cfg.warmup + cfg.steps]
    timed = batches[cfg.warmup:]
    return Run(tokens=sum(b[0] for b in timed), padded=sum(b[1] for b in timed), samples=sum(b[2] for b in timed),
               seconds=stamps[cfg.warmup + cfg.steps - 1] - stamps[cfg.warmup - 1])


# --- our path ---------------------------------------------------------------------------------

def our_datasets(cfg: argparse.Namespace) -> dict[bool, Any]:
    """Tokenized train sets of stages.sft, without and with packing."""
    from stages.core.data import get_dataset
    from stages.core.data.processors import packed_supervised, supervised
    from stages.core.data.template import get_template
    from stages.core.arguments import DataArguments, ModelArguments
    from stages.core.loader import load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(cfg.model_dir)))
    out = {}
    for packing in (False, True):
        data_args = DataArguments(dataset=cfg.dataset, dataset_dir=str(cfg.dataset_dir), cutoff_len=cfg.cutoff_len,
                                  packing=packing)
        template = get_template(tokenizer, data_args.template)
        encode = partial(packed_supervised if packing else supervised, tokenizer=tokenizer, template=template,
                         cutoff_len=data_args.cutoff_len, train_on_prompt=data_args.train_on_prompt)
        out[packing] = get_dataset(data_args, training_args(cfg, False, True), encode, ranking=False).train_dataset
    return out


def run_ours(cfg: argparse.Namespace, dataset, bf16: bool) -> Run:
    from stages.core.data.collator import SupervisedCollator
    from stages.core.arguments import FinetuningArguments, ModelArguments
    from stages.core.loader import get_compute_dtype, load_model, load_tokenizer
    from stages.core.trainers import SupervisedTrainer

    model_args = ModelArguments(model_name_or_path=str(cfg.model_dir))
    args = training_args(cfg, bf16, ours=True)
    tokenizer = load_tokenizer(model_args)
    model = load_model(tokenizer, model_args, FinetuningArguments(finetuning_type="full"), is_trainable=True,
                       compute_dtype=get_compute_dtype(args.bf16, args.fp16))
    mask_dtype = None if model_args.attn_implementation == "sdpa" else get_compute_dtype(args.bf16, args.fp16)
    counter, timer = Counter(SupervisedCollator(tokenizer.pad_token_id, mask_dtype=mask_dtype)), step_timer()
    trainer = SupervisedTrainer(model=model, args=args, data_collator=counter, train_dataset=dataset,
                                processing_class=tokenizer, callbacks=[timer])
    return measure(trainer, counter, timer, cfg)


# --- the plain transformers script ------------------------------------------------------------

def plain_dataset(cfg: argparse.Namespace):
    """The same rows tokenized the way a plain script does it: chat template, prompt masked."""
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
    raw = load_dataset("json", data_files=str(cfg.data_file), split="train")

    def tokenize(example: dict[str, str]) -> dict[str, list[int]]:
        query = "\n".join(example[key] for key in ("instruction", "input") if example.get(key))
        messages = [{"role": "user", "content": query}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": example["output"]}],
                                             tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        input_ids = tokenizer(full, add_special_tokens=False)["input_ids"][: cfg.cutoff_len]
        labels = [-100] * len(prompt_ids) + input_ids[len(prompt_ids):]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels[: cfg.cutoff_len]}

    return raw.map(tokenize, remove_columns=raw.column_names)


def run_plain(cfg: argparse.Namespace, dataset, bf16: bool) -> Run:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=torch.float32)
    counter, timer = Counter(DataCollatorForSeq2Seq(tokenizer, padding=True)), step_timer()
    trainer = Trainer(model=model, args=training_args(cfg, bf16, ours=False), data_collator=counter,
                      train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    return measure(trainer, counter, timer, cfg)


# --- set-up, peak, report ---------------------------------------------------------------------

def prepare(cfg: argparse.Namespace) -> None:
    """Build the bench model once; register the alpaca demo file (or fall back to demo_sft)."""
    cfg.model_dir = cfg.work_dir / "model"
    if not (cfg.model_dir / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "stages.world", "--output_dir", str(cfg.work_dir), "--preset",
                        "bench"], cwd=ROOT, check=True)
    if ALPACA.is_file():
        cfg.dataset_dir, cfg.dataset, cfg.data_file = cfg.work_dir / "alpaca", "alpaca_en_demo", ALPACA
        cfg.dataset_dir.mkdir(exist_ok=True)
        (cfg.dataset_dir / "dataset_info.json").write_text(
            json.dumps({"alpaca_en_demo": {"file_name": str(ALPACA)}}))
    else:
        cfg.dataset_dir, cfg.dataset = cfg.work_dir / "data", "demo_sft"
        info = json.loads((cfg.dataset_dir / "dataset_info.json").read_text())["demo_sft"]
        cfg.data_file = cfg.dataset_dir / info["file_name"]


def matmul_peak(dtype: torch.dtype, size: int = 2048, tries: int = 10) -> float:
    """Best matrix-product rate of this CPU in `dtype`, FLOP/s, through `F.linear` (x @ W^T).

    F.linear is the kernel nn.Linear runs: with bf16 on a CPU without native bf16 it goes through
    oneDNN (~15 GFLOP/s on the dev box), while a plain `torch.matmul` of two bf16 matrices takes a
    fallback ~10x slower, which would make a "peak" that the model's own layers exceed.
    """
    x, weight = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.nn.functional.linear(x, weight)  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def linear_params(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/sft_bench"),
                        help="Cache of the bench model (built on first use) and scratch output.")
    parser.add_argument("--steps", type=int, default=4, help="Timed optimizer steps per run.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed optimizer steps before them.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per configuration (median reported).")
    parser.add_argument("--batch_size", type=int, default=8, help="Rows per step (packed rows count as one).")
    parser.add_argument("--cutoff_len", type=int, default=512, help="Tokens per sample / packed row.")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides.")
    parser.add_argument("--dtypes", default="fp32,bf16", help="Comma-separated: fp32, bf16 (CPU autocast).")
    cfg = parser.parse_args()
    if cfg.warmup < 1 or cfg.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the first step is never timed).")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(cfg.threads)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.disable(logging.INFO)  # stages' INFO lines (trainable params, rows read)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    prepare(cfg)

    start = time.perf_counter()
    peaks = {name: matmul_peak(dtype) for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    params = linear_params(cfg.model_dir)
    ours, plain = our_datasets(cfg), plain_dataset(cfg)
    dtypes = [d.strip() for d in cfg.dtypes.split(",")]
    configs = [(side, packing, dtype) for dtype in dtypes
               for side, packing in (("plain", False), ("ours", False), ("ours", True))]
    results: dict[tuple, list[Run]] = {c: [] for c in configs}
    load_before = os.getloadavg()[0]
    for repeat in range(cfg.repeats):
        for side, packing, dtype in configs if repeat % 2 == 0 else configs[::-1]:
            run = (run_plain(cfg, plain, dtype == "bf16") if side == "plain"
                   else run_ours(cfg, ours[packing], dtype == "bf16"))
            results[(side, packing, dtype)].append(run)
            print(f"  repeat {repeat + 1}: {side:5s} packing={packing!s:5s} {dtype}: {run.tokens_per_s:8.1f} tok/s",
                  flush=True)
            gc.collect()

    print(f"\nmodel {cfg.model_dir} ({params / 1e6:.1f}M linear params), data {cfg.dataset} "
          f"({len(plain)} samples, {len(ours[True])} packed rows), batch {cfg.batch_size}, cutoff_len "
          f"{cfg.cutoff_len}, {cfg.threads} threads, {cfg.warmup}+{cfg.steps} steps x {cfg.repeats} repeats")
    print(f"matmul peak (2048^3, F.linear): bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.1f} "
          f"GFLOP/s; 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after (on {os.cpu_count()} CPUs; other load makes figures noisy)\n")
    header = (f"{'dtype':5s} {'path':14s} {'tok/s':>7s} {'min-max':>11s} {'samples/s':>9s} {'pad%':>5s} "
              f"{'ratio':>5s} {'range':>9s} {'MFU%':>5s} {'own%':>5s}")
    print(header + "\n" + "-" * len(header))
    for side, packing, dtype in configs:
        runs, base = results[(side, packing, dtype)], results[("plain", False, dtype)]
        rates = [r.tokens_per_s for r in runs]
        median = statistics.median(rates)
        # Each run is paired with the plain run of the same repeat (close in time): the ratio of a pair
        # is less exposed to load drifting over the whole benchmark than a ratio of medians.
        ratios = [r.tokens_per_s / b.tokens_per_s for r, b in zip(runs, base)]
        samples = statistics.median(r.samples / r.seconds for r in runs)
        pad = 100 * (1 - sum(r.tokens for r in runs) / sum(r.padded for r in runs))
        name = "plain Trainer" if side == "plain" else "ours packed" if packing else "ours"
        print(f"{dtype:5s} {name:14s} {median:7.1f} {min(rates):5.0f}-{max(rates):<5.0f} {samples:9.2f} {pad:5.1f} "
              f"{statistics.median(ratios):5.2f} {min(ratios):4.2f}-{max(ratios):4.2f} "
              f"{100 * 6 * params * median / peaks['bf16']:5.1f} {100 * 6 * params * median / peaks[dtype]:5.1f}")
    print(f"\n(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
