"""DyPRAG projector training samples/s: our stages.projector loop against a re-implementation of the original loop.

    python bench/projector_throughput.py [--work_dir /tmp/projector_bench] [--source auto|real|demo] ...

Both sides train the same parameter projector (`dyprag.projector_model.Projector`, p=32, fresh from
the same seed each run) for the same ~20M-parameter model (`python -m stages.world --preset bench`) on
the same training pairs (passage, its PRAG LoRA, a QA text about it), with the same loss (LM + 0.01 KL +
100 MSE) and optimizer (torch AdamW, lr 1e-5). Set-up, untimed and cached in --work_dir: the records
(the real PRAG records in ../shared/data/prag_augmented when present, else or with --source demo the
embedded demo_qa gold passages), their LoRA bank written by `python -m stages.encode` (our batched
encoder), each passage's LoRA exported from the bank as a peft adapter folder (`LoraBank.export_peft`),
and the pairs built by `stages.projector.build_pairs` (one per QA pair; the QA text has the passage in
context, the original's training text, unless --qa_with_passage false).

- original: the loop of the original src/train_dyprag.py, re-implemented here step for step: a peft
  model (`get_peft_model`, r=2, alpha=32 on gate/up/down), batch 1 in shuffled order, every QA text
  padded to 3000 tokens with labels on all its real tokens, fp32. Per step: the passage through the
  whole model (LM head included, `output_hidden_states`), the passage's adapter read from disk twice
  (`safetensors.load_file` for the MSE target, `load_adapter` into the peft model for the teacher), the
  teacher forward, the LoRA weights zeroed, the projector, delta = B @ A set as a `delta` attribute
  on each peft layer (the original's forked LlamaMLP adds x @ delta^T; here a forward hook does the
  same product, so no model file is forked), the student forward with labels, KL over all 3000
  positions (`reduction="batchmean"`), MSE per A/B, backward, step, the attributes deleted, the four
  loss values read with `.item()` (the original prints them). The projector is ours on both sides:
  the original's per-(layer, module) modules called one by one would only slow its side down.
  `--pad_to 0` leaves each text at its own length: what the loop costs without its padding.
- ours: `stages.projector.run_projector` itself, in this process (a DeepSpeed ZeRO-0 engine, world of
  one): --per_device_train_batch_size pairs per step, dynamic padding, bank LoRAs held in memory,
  per-sample injection by wrapping, LM/KL on answer tokens only, `--bf16` where bf16 is native.

How it measures, and why this is fair: each run starts from a fresh projector and optimizer and
trains `--warmup` untimed steps, then `--steps` timed ones; samples/s = pairs trained in the timed
steps / their wall time. Ours is stamped at the end of each optimizer step through the stage's own
per-step log call (`stages.core.callbacks.log_step`, wrapped here; --logging_steps 1, --save_strategy no,
so no checkpoint is written inside the window), so model loading and engine set-up stay outside on
both sides alike, as do the original's data preparation and model load. The two sides run in
alternating order, `--repeats` times, in one process with the same torch thread count; the ratio is
taken per repeat (ours over the original run next to it) and the median is reported.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from encode_throughput import REAL_RECORDS, build_model, native_cpu_bf16  # noqa: E402

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

    model_dir = build_model(args.work_dir / "bench", "bench") / "model"
    records, source = pick_records(args, model_dir)
    data = args.work_dir / f"{'real' if 'augment' in records[0] else 'demo'}-{len(records)}r-{args.encode_epochs}e"
    records_file, bank_dir, adapters = data / "records.json", data / "bank", data / "adapters"
    if not (bank_dir / "index.json").is_file() or not adapters.is_dir():
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        records_file.write_text(json.dumps(records))
        print(f"encoding the bank: {records_file} -> {bank_dir}", flush=True)
        subprocess.run([sys.executable, "-m", "stages.encode", "--model_name_or_path", str(model_dir),
                        "--input_file", str(records_file), "--output_dir", str(bank_dir), "--num_train_epochs",
                        str(args.encode_epochs), "--max_batch_tokens", "4096", "--report_to", "none"],
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
    """train_dyprag.py's per-step work (see the module docstring), on a peft-wrapped fp32 model."""

    def __init__(self, setup: Setup, args: argparse.Namespace, device: torch.device, pad_id: int) -> None:
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=torch.float32).to(device)
        self.config = ProjectorConfig.for_model(base, SPEC, projector_p=args.projector_p)
        self.model = get_peft_model(base, LoraConfig(
            task_type=TaskType.CAUSAL_LM, target_modules=list(SPEC.target_modules), inference_mode=False,
            r=SPEC.rank, lora_alpha=SPEC.alpha, lora_dropout=0.0)).eval()
        self.layers = {name: self.model.get_submodule(f"base_model.model.{name}")
                       for name in target_module_names(base, SPEC)}
        for layer in self.layers.values():
            layer.register_forward_hook(_add_delta)
        self.setup, self.args, self.device, self.pad_id = setup, args, device, pad_id

    def sample(self, pair) -> dict[str, Any]:
        """The original's prepared sample: text and labels padded to --pad_to (0: unpadded) as Python lists."""
        text = pair.text[: self.args.pad_to] if self.args.pad_to else pair.text
        pad = self.args.pad_to - len(text) if self.args.pad_to else 0
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
            self.layers[name].delta = (lora_b[0] @ lora_a[0]).float()  # the original's delta_inject (no alpha/r)
        student = self.model(**inputs)
        kl = F.kl_div(F.log_softmax(student.logits, dim=-1), F.softmax(teacher.logits, dim=-1),
                      reduction="batchmean") * self.args.kl_weight
        mse = sum(F.mse_loss(value.float(), real[key].float()) for key, value in outputs.items() if key in real)
        mse = mse * self.args.mse_weight
        (student.loss + kl + mse).backward()
        optimizer.step()
        for layer in self.layers.values():
            del layer.delta
        for value in (mse, student.loss, kl, teacher.loss):  # the original prints the four losses every step
            value.item()

    def run(self, order: list[int], seed: int) -> float:
        """Train warmup + steps samples from a fresh projector; seconds of the timed steps."""
        samples = [self.sample(self.setup.pairs[i]) for i in order]
        torch.manual_seed(seed)
        projector = Projector(self.config).to(self.device).train()
        optimizer = torch.optim.AdamW(projector.parameters(), lr=self.args.learning_rate)
        for sample in samples[: self.args.original_warmup]:
            self.step(sample, projector, optimizer)
        start = time.perf_counter()
        for sample in samples[self.args.original_warmup:]:
            self.step(sample, projector, optimizer)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def _add_delta(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    # The forked LlamaMLP: `proj_output += x @ proj.delta.T` when the projection carries a delta.
    delta = getattr(module, "delta", None)
    return None if delta is None else output + torch.matmul(inputs[0], delta.T)


# --- our stage --------------------------------------------------------------------------------

def run_ours(setup: Setup, args: argparse.Namespace, bf16: bool) -> tuple[int, float]:
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
            "--report_to", "none", "--seed", str(args.seed), *(["--bf16", "true"] if bf16 else [])]
    stamps: list[float] = []
    log_step = callbacks.log_step

    def stamped(*a, **kw) -> None:  # run_projector imports log_step at call time: it gets this one
        if torch.cuda.is_available():
            torch.cuda.synchronize()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/projector_bench"),
                        help="bench model, records, bank and adapter folders (built on first use), scratch runs")
    parser.add_argument("--source", default="auto", choices=["auto", "real", "demo"],
                        help="pairs from the real PRAG records (auto: when present) or the embedded demo_qa")
    parser.add_argument("--passages", type=int, default=24, help="passages in the bank (real: rounded up to 3 per "
                                                                  "record, 3 QA pairs each; demo: one pair each)")
    parser.add_argument("--encode_epochs", type=int, default=2, help="stages.encode epochs for the bank")
    parser.add_argument("--qa_with_passage", type=lambda v: v.lower() == "true", default=True,
                        help="QA texts with the passage in context (the original's text; false: question only)")
    parser.add_argument("--batch_size", type=int, default=8, help="ours: pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=6, help="ours: timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="ours: untimed optimizer steps first")
    parser.add_argument("--original_steps", type=int, default=3, help="original: timed steps (1 pair each)")
    parser.add_argument("--original_warmup", type=int, default=1, help="original: untimed steps first")
    parser.add_argument("--pad_to", type=int, default=3000,
                        help="original: every QA text padded to this length (0: each at its own length, the "
                             "original loop without its padding)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternating (medians reported)")
    parser.add_argument("--projector_p", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--kl_weight", type=float, default=0.01)
    parser.add_argument("--mse_weight", type=float, default=100.0)
    parser.add_argument("--bf16", default="auto", choices=["auto", "true", "false"],
                        help="ours: frozen model in bf16 (auto: on a GPU or a CPU with native bf16)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    if min(args.warmup, args.steps, args.original_warmup, args.original_steps) < 1:
        parser.error("warm-up and timed steps must be >= 1 on both sides")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["TQDM_DISABLE"] = "1"  # the stage's step bar
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    logging.disable(logging.INFO)
    started = time.perf_counter()
    setup = prepare(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = args.bf16 == "true" or (args.bf16 == "auto" and (device.type == "cuda" or native_cpu_bf16()))
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(setup.model_dir).pad_token_id
    original = OriginalLoop(setup, args, device, pad_id)
    lengths = [len(p.text) for p in setup.pairs]
    print(f"model {setup.model_dir} ({sum(p.numel() for p in original.model.parameters()) / 1e6:.1f}M parameters), "
          f"{len(setup.pairs)} pairs from {setup.source}; QA text {min(lengths)}-{max(lengths)} tokens (mean "
          f"{statistics.mean(lengths):.0f}), passage in context: {args.qa_with_passage}; device {device}, threads "
          f"{torch.get_num_threads()}, ours {'bf16' if bf16 else 'fp32'}", flush=True)

    rng = random.Random(args.seed)
    rates: dict[str, list[float]] = {"original": [], "ours": []}
    load_before = os.getloadavg()[0]
    for repeat in range(args.repeats):
        for side in ("original", "ours") if repeat % 2 == 0 else ("ours", "original"):
            if side == "original":  # the original's DataLoader(shuffle=True), batch 1
                order = rng.sample(range(len(setup.pairs)), args.original_warmup + args.original_steps)
                samples, seconds = args.original_steps, original.run(order, args.seed)
            else:
                samples, seconds = run_ours(setup, args, bf16)
            rates[side].append(samples / seconds)
            print(f"  repeat {repeat + 1}: {side:8s} {samples:3d} samples in {seconds:6.1f} s: "
                  f"{samples / seconds:7.3f} samples/s", flush=True)
            gc.collect()

    ratios = [ours / theirs for ours, theirs in zip(rates["ours"], rates["original"])]
    print(f"\n1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (on {os.cpu_count()} CPUs)")
    header = f"{'side':44s} {'samples/s':>9s} {'min-max':>13s} {'s/sample':>8s}"
    print(header + "\n" + "-" * len(header))
    names = {"original": f"original (batch 1, pad {args.pad_to or 'none'}, fp32, peft x2)",
             "ours": f"ours (stages.projector, batch {args.batch_size}, {'bf16' if bf16 else 'fp32'})"}
    for side, name in names.items():
        median = statistics.median(rates[side])
        print(f"{name:44s} {median:9.3f} {min(rates[side]):6.3f}-{max(rates[side]):<6.3f} {1 / median:8.2f}")
    print(f"ratio ours / original: {statistics.median(ratios):.1f}x (per-repeat range "
          f"{min(ratios):.1f}-{max(ratios):.1f}x; target >= 5x)")
    print(f"(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
