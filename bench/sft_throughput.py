"""sft training throughput: our stages.sft code path against a plain transformers.Trainer script.

    python bench/sft_throughput.py [--preset smollm2|bench] [--steps 3] [--repeats 3] [--dtypes fp32,bf16] ...

Both sides train the same model (by default the real pretrained embedded SmolLM2-135M-Instruct,
`--preset bench` the ~20M random bench model) on the same alpaca data (../shared/data/llamafactory_demo/
alpaca_en_demo.json when present, else the embedded demo_sft), full fine-tuning, AdamW, the same batch
size, learning rate, seed, thread count and dtype (fp32, or bf16 = autocast over fp32 master weights,
as `--bf16` gives).

The rows, each built from scratch per run:
- plain Trainer: what a user writes with transformers alone: the chat template through
  `apply_chat_template`, labels -100 on the prompt, `DataCollatorForSeq2Seq` (padding to the longest
  row), `AutoModelForCausalLM`, `Trainer`.
- plain Trainer, group_by_length: the same with `train_sampling_strategy="group_by_length"`
  (transformers 5's spelling of `group_by_length=True`), the Trainer's own answer to padding
  (batches of similar lengths). The like-for-like baseline of the headline ratios.
- ours / ours, group_by_length: the code `python -m stages.sft` runs, assembled in process:
  `stages.core.data.get_dataset` with `supervised`, `stages.core.loader.load_model` (finetuning_type
  full), `SupervisedCollator`, `SupervisedTrainer`; with and without group_by_length.
- ours packed: the same with `--packing` (`packed_supervised`, block-diagonal attention).

How it measures, and why this is fair:
- Everything runs in this one process, so all rows share interpreter, allocator and threads. Each
  run trains `warmup + steps` optimizer steps; only the last `steps` are timed (a callback stamps
  the end of every step), so model loading, tokenization and the first slow steps are excluded
  alike. Collation is inside the timed window: it is part of the path.
- Tokens are counted by a thin wrapper around each side's collator: the real (non-padding) tokens
  of every batch. The i-th collated batch is the i-th step's batch (gradient accumulation 1), so
  tokens of the timed steps / their wall time is exact.
- The same rows and sampler seed give the unpacked sides the same samples in the same order: the
  script checks it, and stops unless ours and the plain Trainer trained exactly the same number of
  real tokens and samples in the timed steps of every repeat (with and without group_by_length).
- The rows run in alternating order (reversed on every other repeat), `--repeats` times; each
  figure is the median with the range of the repeats. A ratio pairs a run with its baseline's run
  of the same repeat.

Columns: see bench/README.md. MFU = 6 N tokens/s over the matmul peak of the row's dtype measured in
this run (bench/measure.py), N = the linear layers' parameters (lm_head included, embedding lookups
and attention scores excluded).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import (DTYPES, PRESET_HELP, PRESETS, ROOT, alternate, linear_params, machine_line,  # noqa: E402
                           matmul_peak, profile, spread, sync, world)

ALPACA = ROOT.parent / "shared" / "data" / "llamafactory_demo" / "alpaca_en_demo.json"
# (name, side, grouped by length, packed); the baseline of each ratio is named in RATIOS.
ROWS = [("plain Trainer", "plain", False, False), ("plain Trainer, group_by_length", "plain", True, False),
        ("ours", "ours", False, False), ("ours, group_by_length", "ours", True, False),
        ("ours packed", "ours", False, True)]
RATIOS = {"ours": "plain Trainer", "ours, group_by_length": "plain Trainer, group_by_length",
          "ours packed": "plain Trainer, group_by_length"}
SAME_BATCHES = {"ours": "plain Trainer", "ours, group_by_length": "plain Trainer, group_by_length"}


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


def step_timer(device: str):
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.stamps.append(time.perf_counter())

    return StepTimer()


def training_args(cfg: argparse.Namespace, bf16: bool, ours: bool, grouped: bool = False):
    from transformers import Seq2SeqTrainingArguments

    # Identical for both sides; stages.sft additionally keeps unused columns (segment_ids).
    return Seq2SeqTrainingArguments(
        output_dir=str(cfg.work_dir / "runs"), per_device_train_batch_size=cfg.batch_size,
        max_steps=cfg.warmup + cfg.steps, learning_rate=1e-5, optim="adamw_torch", lr_scheduler_type="constant",
        bf16=bf16, use_cpu=cfg.device == "cpu", seed=42, logging_steps=10**6, save_strategy="no", report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=not ours,
        train_sampling_strategy="group_by_length" if grouped else "random")


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
    from stages.core.arguments import DataArguments, ModelArguments
    from stages.core.data import get_dataset
    from stages.core.data.processors import packed_supervised, supervised
    from stages.core.data.template import get_template
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


def run_ours(cfg: argparse.Namespace, dataset, bf16: bool, grouped: bool) -> Run:
    from stages.core.arguments import FinetuningArguments, ModelArguments
    from stages.core.data.collator import SupervisedCollator
    from stages.core.loader import get_compute_dtype, load_model, load_tokenizer
    from stages.core.trainers import SupervisedTrainer

    model_args = ModelArguments(model_name_or_path=str(cfg.model_dir))
    args = training_args(cfg, bf16, ours=True, grouped=grouped)
    tokenizer = load_tokenizer(model_args)
    model = load_model(tokenizer, model_args, FinetuningArguments(finetuning_type="full"), is_trainable=True,
                       compute_dtype=get_compute_dtype(args.bf16, args.fp16))
    mask_dtype = None if model_args.attn_implementation == "sdpa" else get_compute_dtype(args.bf16, args.fp16)
    counter, timer = Counter(SupervisedCollator(tokenizer.pad_token_id, mask_dtype=mask_dtype)), step_timer(cfg.device)
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
        # The template's text after the answer's end-of-turn token (ChatML's newline) is not trained on, as in
        # stages.sft, so both sides train on the same tokens.
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": example["output"]}],
                                             tokenize=False).rstrip("\n")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        input_ids = tokenizer(full, add_special_tokens=False)["input_ids"][: cfg.cutoff_len]
        labels = [-100] * len(prompt_ids) + input_ids[len(prompt_ids):]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels[: cfg.cutoff_len]}

    return raw.map(tokenize, remove_columns=raw.column_names)


def run_plain(cfg: argparse.Namespace, dataset, bf16: bool, grouped: bool) -> Run:
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype=torch.float32)
    counter, timer = Counter(DataCollatorForSeq2Seq(tokenizer, padding=True)), step_timer(cfg.device)
    trainer = Trainer(model=model, args=training_args(cfg, bf16, ours=False, grouped=grouped), data_collator=counter,
                      train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
    return measure(trainer, counter, timer, cfg)


# --- set-up, report ---------------------------------------------------------------------------

def prepare(cfg: argparse.Namespace) -> None:
    """The model (built or linked once); register the alpaca demo file (or fall back to demo_sft)."""
    folder = world(cfg.work_dir, cfg.preset)
    cfg.model_dir = folder / "model"
    if ALPACA.is_file():
        cfg.dataset_dir, cfg.dataset, cfg.data_file = cfg.work_dir / "alpaca", "alpaca_en_demo", ALPACA
        cfg.dataset_dir.mkdir(exist_ok=True)
        (cfg.dataset_dir / "dataset_info.json").write_text(
            json.dumps({"alpaca_en_demo": {"file_name": str(ALPACA)}}))
    else:
        cfg.dataset_dir, cfg.dataset = folder / "data", "demo_sft"
        info = json.loads((cfg.dataset_dir / "dataset_info.json").read_text())["demo_sft"]
        cfg.data_file = cfg.dataset_dir / info["file_name"]


def check_same_batches(results: dict[tuple[str, str], list[Run]], dtype: str) -> None:
    """Stop unless each unpacked side of ours trained exactly its baseline's tokens and samples in every repeat."""
    for ours, plain in SAME_BATCHES.items():
        for repeat, (a, b) in enumerate(zip(results[(ours, dtype)], results[(plain, dtype)])):
            if (a.tokens, a.samples) != (b.tokens, b.samples):
                sys.exit(f"{dtype} repeat {repeat + 1}: {ours!r} trained {a.tokens} tokens / {a.samples} samples in "
                         f"its timed steps, {plain!r} {b.tokens} / {b.samples}: the two sides did not see the same "
                         f"batches, so their rates do not compare")


def report(cfg: argparse.Namespace, results: dict, configs: list, peaks: dict, params: int, ours: dict, plain,
           header: str) -> None:
    """Check the batches, then print the table."""
    dtypes = list(peaks)
    # Peaks again after the runs: the better of the two (one reading on a shared host can be low).
    peaks = {name: max(peak, matmul_peak(DTYPES[name], cfg.device)) for name, peak in peaks.items()}
    for dtype in dtypes:
        check_same_batches(results, dtype)

    print(f"\n{header}\nmodel {cfg.model_dir.resolve()} ({params / 1e6:.1f}M linear params), data {cfg.dataset} "
          f"({len(plain)} samples, {len(ours[True])} packed rows), batch {cfg.batch_size}, cutoff_len "
          f"{cfg.cutoff_len}, {cfg.warmup}+{cfg.steps} steps x {cfg.repeats} repeats; matmul peak (F.linear): "
          f"{', '.join(f'{d} {p / 1e9:.1f}' for d, p in peaks.items())} GFLOP/s; same tokens and samples in the "
          f"timed steps of ours and the plain Trainer in every repeat: checked")
    table = (f"{'dtype':5s} {'row':32s} {'tok/s (min-max)':>22s} {'samples/s':>9s} {'pad%':>5s} "
             f"{'ratio (min-max)':>17s} {'MFU%':>5s}")
    print(table + "\n" + "-" * len(table))
    for name, dtype in configs:
        runs = results[(name, dtype)]
        rates = [r.tokens_per_s for r in runs]
        ratio = "-"
        if name in RATIOS:
            # Each run is paired with its baseline's run of the same repeat (close in time).
            ratio = spread([r.tokens_per_s / b.tokens_per_s for r, b in zip(runs, results[(RATIOS[name], dtype)])])
        samples = statistics.median(r.samples / r.seconds for r in runs)
        pad = 100 * (1 - sum(r.tokens for r in runs) / sum(r.padded for r in runs))
        print(f"{dtype:5s} {name:32s} {spread(rates, 1):>22s} {samples:9.2f} {pad:5.1f} {ratio:>17s} "
              f"{100 * 6 * params * statistics.median(rates) / peaks[dtype]:5.1f}")
    print("ratios: ours / plain Trainer; ours, group_by_length and ours packed / plain Trainer, group_by_length "
          "(goals: packed >= 1.3x, unpacked >= 1.0x; MFU goal for packed fp32 >= 50 %)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2", choices=PRESETS, help=PRESET_HELP)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/sft_bench"),
                        help="Cache of the model folder (built on first use) and scratch output.")
    parser.add_argument("--steps", type=int, default=3, help="Timed optimizer steps per run.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed optimizer steps before them.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per row, in alternating order.")
    parser.add_argument("--batch_size", type=int, default=8, help="Rows per step (a packed row counts as one).")
    parser.add_argument("--cutoff_len", type=int, default=512, help="Tokens per sample / packed row.")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, all rows.")
    parser.add_argument("--dtypes", default="fp32", help="Comma-separated: fp32, bf16 (autocast).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                        help="Where both sides train (default: cuda when present).")
    parser.add_argument("--profile", nargs="+", default=[], choices=[row[0] for row in ROWS], metavar="ROW",
                        help="Also run these rows once each under torch.profiler (first dtype) and print where their "
                             "time goes; with --repeats 0, only that.")
    cfg = parser.parse_args()
    if cfg.warmup < 1 or cfg.steps < 1 or cfg.repeats < (0 if cfg.profile else 1):
        parser.error("--warmup, --steps and --repeats must be >= 1 (the first step is never timed; --repeats 0 only "
                     "with --profile).")

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

    start, header = time.perf_counter(), machine_line(cfg.threads)
    dtypes = [d.strip() for d in cfg.dtypes.split(",")]
    peaks = {name: matmul_peak(DTYPES[name], cfg.device) for name in dtypes}
    params = linear_params(cfg.model_dir)
    ours, plain = our_datasets(cfg), plain_dataset(cfg)
    configs = [(row[0], dtype) for dtype in dtypes for row in ROWS]
    sides = {row[0]: row[1:] for row in ROWS}
    results: dict[tuple[str, str], list[Run]] = {c: [] for c in configs}
    for repeat in range(cfg.repeats):
        for name, dtype in alternate(configs, repeat):
            side, grouped, packed = sides[name]
            run = (run_plain(cfg, plain, dtype == "bf16", grouped) if side == "plain"
                   else run_ours(cfg, ours[packed], dtype == "bf16", grouped))
            results[(name, dtype)].append(run)
            print(f"  repeat {repeat + 1}: {name:32s} {dtype}: {run.tokens_per_s:8.1f} tok/s", flush=True)
            gc.collect()
    if cfg.repeats:
        report(cfg, results, configs, peaks, params, ours, plain, header)
    for name in cfg.profile:
        side, grouped, packed = sides[name]
        print(f"\n{name}, {dtypes[0]}, one run ({cfg.warmup}+{cfg.steps} steps) under torch.profiler:")
        profile(partial(run_plain, cfg, plain, dtypes[0] == "bf16", grouped) if side == "plain"
                else partial(run_ours, cfg, ours[packed], dtypes[0] == "bf16", grouped))
    print(f"(total {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
