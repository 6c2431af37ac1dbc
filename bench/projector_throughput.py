"""DyPRAG projector training samples/s: our stages.projector loop against a re-implementation of the original loop.

    python bench/projector_throughput.py [--preset smollm2|bench] [--source auto|real|demo] [--repeats 3] ...

Both sides train the same parameter projector (`dyprag.projector_model.Projector`, p=32, fresh from
the same seed each run) for the same model (the real pretrained SmolLM2-135M-Instruct by default,
`--preset bench` the ~20M random bench model) on the same training pairs (passage, its PRAG LoRA, a
QA text about it), with the same objective (train_dyprag.py's: LM over every token of the text + 0.01
KL summed over the text's tokens + 100 MSE, the student's LoRA injected unscaled), the same optimizer
(torch AdamW, lr 1e-5) and the same precision (fp32; `--bf16 true`: the frozen model in bf16 on both
sides). Set-up, untimed and cached in --work_dir: the records (the real PRAG records in
../shared/data/prag_augmented when present, else or with --source demo the embedded demo_qa gold
passages), their LoRA bank written by `python -m stages.encode`, each passage's LoRA exported from
the bank as a peft adapter folder (`LoraBank.export_peft`), and the pairs built by
`stages.projector.build_pairs` (one per QA pair; the QA text has the passage in context, the
original's training text, unless --qa_with_passage false).

Rows:
- original: the loop of the original src/train_dyprag.py, re-implemented here step for step, without
  its padding (each QA text at its own length): a peft model (`get_peft_model`, r=2, alpha=32 on
  gate/up/down), batch 1 in shuffled order, labels on every token of the text. Per step: the passage
  through the whole model (LM head included, `output_hidden_states`), the passage's adapter read from
  disk twice (`safetensors.load_file` for the MSE target, `load_adapter` into the peft model for the
  teacher), the teacher forward, the LoRA weights zeroed, the projector, delta = B @ A set as a
  `delta` attribute on each peft layer (the original's forked LlamaMLP adds x @ delta^T; here a
  forward hook does the same product, so no model file is forked), the student forward with labels,
  KL (`reduction="batchmean"`: the sum over the positions at batch 1), MSE per A/B, backward, step,
  the attributes deleted, the four loss values read with `.item()` (the original prints them). The
  projector is ours on both sides: the original's per-(layer, module) modules called one by one
  would only slow its side down. The baseline of the headline ratio.
- original, padded to 3000: the same with every text padded to `--pad_to` tokens, as the original
  does (its KL then also sums over the pads). Timed on `--padded_steps` samples.
- ours: `stages.projector.run_projector` itself with `--objective original`, in this process (a
  DeepSpeed ZeRO-0 engine, world of one): --batch_size pairs per step, dynamic padding, bank LoRAs
  held in memory, per-sample injection by wrapping.
- ours, answer objective: the same with the stage's default `--objective answer` (LM and KL over
  the answer tokens); a different objective, so an extra row, not the headline.

How it measures, and why this is fair: each run starts from a fresh projector and optimizer and
trains untimed warm-up steps, then timed ones; samples/s = pairs trained in the timed steps / their
wall time. Ours is stamped at the end of each optimizer step through the stage's own per-step log
call (`stages.core.callbacks.log_step`, wrapped here; --logging_steps 1, --save_strategy no, so no
checkpoint is written inside the window), so model loading and engine set-up stay outside on both
sides alike, as do the original's data preparation and model load. The rows run in alternating
order, `--repeats` times, in one process with the same torch thread count; a ratio pairs a run with
the original run of the same repeat; figures are medians with the range of the repeats.

MFU: nominal model FLOPs per pair, 2N x passage tokens (the passage read) + 2N x text tokens (the
teacher) + 4N x text tokens (the student's forward and input gradients), N = the linear layers'
parameters, the mean over the pairs; the same for every row. It is set against the matmul peak of
the run's dtype, measured in this run.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import (PRESET_HELP, PRESETS, REAL_RECORDS, ROOT, alternate, linear_params,  # noqa: E402
                           machine_line, matmul_peak, profile, spread, sync, world)
from dyprag.bank import LoraBank  # noqa: E402
from dyprag.lora import LoraSpec, target_module_names  # noqa: E402
from dyprag.projector_model import Projector, ProjectorConfig  # noqa: E402

SPEC = LoraSpec()


@dataclass
class Setup:
    model_dir: Path
    records_file: Path
    bank_dir: Path
    adapters: Path  # one peft adapter folder per passage id
    pairs: list  # stages.projector.Pair
    source: str


def pick_records(args: argparse.Namespace, model_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """Records holding about --passages passages: real PRAG records (3 passages each) or demo gold passages."""
    if args.source == "real" and not REAL_RECORDS.is_file():
        raise SystemExit(f"--source real: {REAL_RECORDS} is absent")
    if args.source != "demo" and REAL_RECORDS.is_file():
        records = json.loads(REAL_RECORDS.read_text())[: math.ceil(args.passages / 3)]
        return records, f"{REAL_RECORDS.name}: {len(records)} records x 3 passages, their augmentation QA pairs"
    # one training record per entity, trimmed to its gold passage (the others would only be encoded, never paired)
    records, seen = [], set()
    for record in json.loads((model_dir.parent / "data" / "demo_qa.json").read_text()):
        if record["split"] == "train" and record["entity_id"] not in seen:
            seen.add(record["entity_id"])
            records.append({**record, "passages": record["passages"][:1], "passage_ids": record["passage_ids"][:1]})
    return records[: args.passages], "embedded demo_qa: gold passage + the record's question, one per entity"


def prepare(args: argparse.Namespace) -> Setup:
    """Model, records, bank (stages.encode), peft folders and pairs; cached per (source, passages, epochs)."""
    from dyprag.records import detect_augment_model
    from stages.core.arguments import ModelArguments
    from stages.core.loader import load_tokenizer
    from stages.core.dyprag_arguments import ProjectorArguments
    from stages.projector import build_pairs

    model_dir = world(args.work_dir, args.preset) / "model"
    records, source = pick_records(args, model_dir)
    kind = "real" if "augment" in records[0] else "demo"
    data = args.work_dir / f"{args.preset}-{kind}-{len(records)}r-{args.encode_epochs}e"
    records_file, bank_dir, adapters = data / "records.json", data / "bank", data / "adapters"
    if not (bank_dir / "index.json").is_file() or not adapters.is_dir():
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        records_file.write_text(json.dumps(records))
        print(f"encoding the bank: {records_file} -> {bank_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "stages.encode", "--model_name_or_path", str(model_dir),
                        "--input_file", str(records_file), "--output_dir", str(bank_dir), "--num_train_epochs",
                        str(args.encode_epochs), "--report_to", "none"],
                       check=True, cwd=ROOT, capture_output=True)
        bank = LoraBank(bank_dir)
        for pid in bank.passage_ids:  # what the original reads: data_<test_id>/passage_<pid> adapter folders
            bank.export_peft(pid, adapters / pid)
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=str(model_dir)))
    proj_args = ProjectorArguments(data_file=str(records_file), bank_dir=str(bank_dir),
                                   qa_with_passage=args.qa_with_passage)
    augment = detect_augment_model(records) if any(r.get("augment") for r in records) else None
    pairs, too_long = build_pairs(records, augment, tokenizer, proj_args)
    if too_long:
        raise SystemExit(f"{too_long} QA texts are longer than the stage's cutoff_len")
    return Setup(model_dir, records_file, bank_dir, adapters, pairs, source)


# --- the original loop ------------------------------------------------------------------------

class OriginalLoop:
    """train_dyprag.py's per-step work (see the module docstring), on a peft-wrapped model."""

    def __init__(self, setup: Setup, args: argparse.Namespace, device: torch.device, pad_id: int) -> None:
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if args.bf16 else torch.float32
        base = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=dtype).to(device)
        self.config = ProjectorConfig.for_model(base, SPEC, projector_p=args.projector_p)
        self.model = get_peft_model(base, LoraConfig(
            task_type=TaskType.CAUSAL_LM, target_modules=list(SPEC.target_modules), inference_mode=False,
            r=SPEC.rank, lora_alpha=SPEC.alpha, lora_dropout=0.0)).eval()
        self.layers = {name: self.model.get_submodule(f"base_model.model.{name}")
                       for name in target_module_names(base, SPEC)}
        for layer in self.layers.values():
            layer.register_forward_hook(_add_delta)
        self.setup, self.args, self.device, self.pad_id = setup, args, device, pad_id

    def sample(self, pair, pad_to: int) -> dict[str, Any]:
        """The original's prepared sample: text and labels padded to pad_to (0: unpadded) as Python lists."""
        text = pair.text[:pad_to] if pad_to else pair.text
        pad = pad_to - len(text) if pad_to else 0
        return {"folder": self.setup.adapters / pair.passage_id, "passage": [pair.passage],
                "input_ids": text + [self.pad_id] * pad, "labels": text + [-100] * pad,
                "attention_mask": [1] * len(text) + [0] * pad}

    def step(self, sample: dict[str, Any], projector: Projector, optimizer: torch.optim.Optimizer) -> None:
        from safetensors.torch import load_file

        optimizer.zero_grad()
        with torch.no_grad():  # the collator: last layer, last token of the passage through the peft model
            hidden = self.model(torch.tensor(sample["passage"], device=self.device),
                                output_hidden_states=True).hidden_states[-1][:, -1, :]
        inputs = {key: torch.tensor([sample[key]], device=self.device)
                  for key in ("input_ids", "labels", "attention_mask")}
        real = load_file(str(sample["folder"] / "adapter_model.safetensors"), device=self.device.type)  # read 1
        with torch.no_grad():
            self.model.load_adapter(str(sample["folder"]), adapter_name="default")  # read 2: the teacher
            self.model.set_adapter("default")
            teacher = self.model(**inputs)
            for name, param in self.model.named_parameters():
                if "lora_" in name:
                    param.data.zero_()
        generated = projector(hidden.float())
        outputs = {}
        for name, (lora_a, lora_b) in generated.items():
            outputs[f"base_model.model.{name}.lora_A.weight"] = lora_a[0]
            outputs[f"base_model.model.{name}.lora_B.weight"] = lora_b[0]
            # the original's delta_inject (no alpha/r), in the model's dtype
            self.layers[name].delta = (lora_b[0] @ lora_a[0]).to(hidden.dtype)
        student = self.model(**inputs)
        kl = F.kl_div(F.log_softmax(student.logits.float(), dim=-1), F.softmax(teacher.logits.float(), dim=-1),
                      reduction="batchmean") * self.args.kl_weight
        mse = sum(F.mse_loss(value.float(), real[key].float()) for key, value in outputs.items() if key in real)
        mse = mse * self.args.mse_weight
        (student.loss + kl + mse).backward()
        optimizer.step()
        for layer in self.layers.values():
            del layer.delta
        for value in (mse, student.loss, kl, teacher.loss):  # the original prints the four losses every step
            value.item()

    def run(self, order: list[int], pad_to: int) -> float:
        """Train the pairs of `order` from a fresh projector, the first --original_warmup untimed; seconds of the
        rest."""
        warmup = self.args.original_warmup
        samples = [self.sample(self.setup.pairs[i], pad_to) for i in order]
        torch.manual_seed(self.args.seed)
        projector = Projector(self.config).to(self.device).train()
        optimizer = torch.optim.AdamW(projector.parameters(), lr=self.args.learning_rate)
        for sample in samples[:warmup]:
            self.step(sample, projector, optimizer)
        sync(self.device)
        start = time.perf_counter()
        for sample in samples[warmup:]:
            self.step(sample, projector, optimizer)
        sync(self.device)
        return time.perf_counter() - start


def _add_delta(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    # The forked LlamaMLP: `proj_output += x @ proj.delta.T` when the projection carries a delta.
    delta = getattr(module, "delta", None)
    return None if delta is None else output + torch.matmul(inputs[0], delta.T)


# --- our stage --------------------------------------------------------------------------------

def run_ours(setup: Setup, args: argparse.Namespace, objective: str) -> tuple[int, float]:
    """`stages.projector.run_projector` in process; (samples, seconds) of its timed optimizer steps."""
    import stages.core.callbacks as callbacks
    from stages.projector import run_projector

    out = args.work_dir / "ours_run"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--model_name_or_path", str(setup.model_dir), "--data_file", str(setup.records_file),
            "--bank_dir", str(setup.bank_dir), "--output_dir", str(out), "--qa_with_passage",
            str(args.qa_with_passage).lower(), "--per_device_train_batch_size", str(args.batch_size),
            "--max_steps", str(args.warmup + args.steps), "--learning_rate", str(args.learning_rate),
            "--projector_p", str(args.projector_p), "--kl_weight", str(args.kl_weight),
            "--mse_weight", str(args.mse_weight), "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--seed", str(args.seed), "--objective", objective,
            *(["--bf16", "true"] if args.bf16 else [])]
    stamps: list[float] = []
    log_step = callbacks.log_step

    def stamped(*a, **kw) -> None:  # run_projector imports log_step at call time: it gets this one
        sync()
        stamps.append(time.perf_counter())
        log_step(*a, **kw)

    callbacks.log_step = stamped
    try:
        run_projector(argv)
    finally:
        callbacks.log_step = log_step
    if len(stamps) != args.warmup + args.steps:
        raise SystemExit(f"expected one log_step call per optimizer step, got {len(stamps)}: the stage changed")
    # Micro-batch sizes as the stage's Plan deals them (one rank, no accumulation): full batches, then the
    # epoch's remainder.
    count = len(setup.pairs)
    epoch = [args.batch_size] * (count // args.batch_size) + ([count % args.batch_size] if count % args.batch_size
                                                              else [])
    sizes = (epoch * (args.warmup + args.steps))[: args.warmup + args.steps]
    return sum(sizes[args.warmup:]), stamps[-1] - stamps[args.warmup - 1]


ROWS = {"original": "original (batch 1, unpadded, peft x2)", "padded": "original, padded to {pad_to}",
        "ours": "ours (--objective original, batch {batch})", "answer": "ours, answer objective (batch {batch})"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2", choices=PRESETS, help=PRESET_HELP)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/projector_bench"),
                        help="model, records, bank and adapter folders (built on first use), scratch runs")
    parser.add_argument("--source", default="auto", choices=["auto", "real", "demo"],
                        help="pairs from the real PRAG records (auto: when present) or the embedded demo_qa")
    parser.add_argument("--passages", type=int, default=12, help="passages in the bank (real: rounded up to 3 per "
                                                                  "record, 3 QA pairs each; demo: one pair each)")
    parser.add_argument("--encode_epochs", type=int, default=1, help="stages.encode epochs for the bank")
    parser.add_argument("--qa_with_passage", type=lambda v: v.lower() == "true", default=True,
                        help="QA texts with the passage in context (the original's text; false: question only)")
    parser.add_argument("--rows", default="original,padded,ours,answer", help="comma-separated, from " +
                        ", ".join(ROWS) + " (original and ours are needed for the headline ratio)")
    parser.add_argument("--batch_size", type=int, default=8, help="ours: pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=2, help="ours: timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="ours: untimed optimizer steps first")
    parser.add_argument("--original_steps", type=int, default=16, help="original: timed steps (1 pair each)")
    parser.add_argument("--original_warmup", type=int, default=1, help="original: untimed steps first")
    parser.add_argument("--pad_to", type=int, default=3000, help="original, padded: every QA text padded to this")
    parser.add_argument("--padded_steps", type=int, default=4, help="original, padded: timed steps")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row, alternating (medians reported)")
    parser.add_argument("--projector_p", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--kl_weight", type=float, default=0.01)
    parser.add_argument("--mse_weight", type=float, default=100.0)
    parser.add_argument("--bf16", type=lambda v: v.lower() == "true", default=False,
                        help="true: the frozen model in bf16 on every row (default fp32)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, every row")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--profile", default=None, choices=list(ROWS),
                        help="also run this row once under torch.profiler and print where its time goes")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not set(rows) <= set(ROWS) or not {"original", "ours"} <= set(rows):
        parser.error(f"--rows: original and ours, plus any of {', '.join(ROWS)}")
    if min(args.warmup, args.steps, args.original_warmup, args.original_steps, args.padded_steps, args.repeats) < 1:
        parser.error("warm-up and timed steps and --repeats must be >= 1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["TQDM_DISABLE"] = "1"  # the stage's step bar
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    logging.disable(logging.INFO)
    started, header = time.perf_counter(), machine_line(args.threads)
    setup = prepare(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = matmul_peak(dtype, device.type)
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(setup.model_dir).pad_token_id
    original = OriginalLoop(setup, args, device, pad_id)
    lengths = [len(p.text) for p in setup.pairs]
    n = linear_params(original.model.get_base_model())
    flops_per_pair = statistics.mean(2 * n * len(p.passage) + 6 * n * len(p.text) for p in setup.pairs)

    rng = random.Random(args.seed)

    def run_row(row: str) -> tuple[int, float]:
        """(timed samples, their seconds) of one run of `row`."""
        if row in ("ours", "answer"):
            return run_ours(setup, args, "original" if row == "ours" else "answer")
        steps = args.original_steps if row == "original" else args.padded_steps
        order = rng.sample(range(len(setup.pairs)), args.original_warmup + steps)  # DataLoader(shuffle=True)
        return steps, original.run(order, 0 if row == "original" else args.pad_to)

    rates: dict[str, list[float]] = {row: [] for row in rows}
    for repeat in range(args.repeats):
        for row in alternate(rows, repeat):
            samples, seconds = run_row(row)
            rates[row].append(samples / seconds)
            print(f"  repeat {repeat + 1}: {row:8s} {samples:3d} samples in {seconds:6.1f} s: "
                  f"{samples / seconds:7.3f} samples/s", flush=True)
            gc.collect()
    peak = max(peak, matmul_peak(dtype, device.type))

    print(f"\n{header}\nmodel {setup.model_dir.resolve()} ({n / 1e6:.1f}M linear params), {len(setup.pairs)} pairs "
          f"from {setup.source}; QA text {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), "
          f"passage in context: {args.qa_with_passage}; {'bf16' if args.bf16 else 'fp32'} on every row, device "
          f"{device}; {args.repeats} repeats; matmul peak {peak / 1e9:.1f} GFLOP/s; nominal model FLOPs per pair "
          f"{flops_per_pair / 1e9:.1f} G")
    table = f"{'row':40s} {'samples/s (min-max)':>22s} {'s/sample':>8s} {'ratio (min-max)':>20s} {'MFU%':>5s}"
    print(table + "\n" + "-" * len(table))
    for row in rows:
        median = statistics.median(rates[row])
        ratio = "-" if row == "original" else spread([a / b for a, b in zip(rates[row], rates["original"])])
        name = ROWS[row].format(pad_to=args.pad_to, batch=args.batch_size)
        print(f"{name:40s} {spread(rates[row], 3):>22s} {1 / median:8.2f} {ratio:>20s} "
              f"{100 * flops_per_pair * median / peak:5.1f}")
    print("ratio: each row over the unpadded original run of the same repeat (goal: ours >= 2x)")
    if "padded" in rows:
        print(f"ours / original padded to {args.pad_to}: "
              f"{spread([a / b for a, b in zip(rates['ours'], rates['padded'])], 1)}")
    if args.profile:
        name = ROWS[args.profile].format(pad_to=args.pad_to, batch=args.batch_size)
        print(f"\n{name}, one run under torch.profiler:")
        profile(lambda: run_row(args.profile))
    print(f"(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
