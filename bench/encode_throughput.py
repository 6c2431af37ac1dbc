"""PRAG encoding throughput: batched per-passage LoRA training against sequential peft loops; bank loading.

    python bench/encode_throughput.py [--work_dir /tmp/encode_bench] [--preset bench] [--passages 32] ...

Encoding. Every side trains the same passages' LoRAs (r=2, alpha=32 on gate/up/down of every
layer) from the same saved initialisation with the same recipe (dyprag.passage_training: the PRAG texts
of each passage, AdamW lr 3e-4, one text per step, one epoch) on the same model (`python -m
stages.world --preset bench`, ~20M parameters, built once into --work_dir). Texts: the real
PRAG records in ../shared/data/prag_augmented when present (their passages, rewrites and QA),
else (or with --source demo) the embedded demo_qa gold passages with their questions as QA
pairs and the sentences in reverse order as the rewrite.
- original: the original PRAG loop (src/encode.py): per passage `PeftModel.from_pretrained`
  of the shared init, torch AdamW, batch 1, every text padded to 3000 tokens, fp32,
  `save_pretrained`, `unload`. Slow, so timed on the first `--original_passages` passages.
- peft fp32 / peft bf16: the same loop without the padding (each text at its own length),
  the base in fp32 or bf16: the strongest sequential baseline. Timed on all passages.
- batched fp32 / batched bf16: dyprag.passage_training.encode_batch, `--passages_per_batch` passages
  per batched forward/backward, written to a LoRA bank (the write is timed too).
Warm-up, untimed: the batched sides run the whole set once on a GPU (each batch shape selects
its kernels once) and four passages on a CPU (no per-shape kernel choice there: code paths and
allocator only), the peft sides one passage; then the set is timed end to end. "passages/s"
= passages / wall seconds; "tokens/s" counts the real (unpadded) tokens trained on. The
GFLOP/s column is the model FLOPs each side does per second on real tokens (4 x the linear
layers' parameters per token: forward and input gradients of the frozen layers), and "% peak"
sets it against this CPU's best matrix product in the side's dtype (bench/sft_throughput.py's
`matmul_peak`): where the sequential loop already runs near that peak, no batching can beat it
by much, since both sides do the same products. The check column is the largest
|difference| of the side's LoRA weights to the peft fp32 side's: float rounding for the fp32
sides (the original's padding, mathematically a no-op, moves the weights by as much as
batching does: Adam's normalisation magnifies rounding where a gradient is near zero), bf16
rounding for the bf16 sides.

Loading 64 LoRAs for one batch: the bank (`LoraBank.load`, shards memory-mapped; cold = a
fresh LoraBank including its sha256 check of the shards, warm = handles cached) against 64
peft adapter folders, both as the original does it (`PeftModel.from_pretrained` + `unload`
per passage) and with one PeftModel and `load_adapter` per folder.

Use `--threads` to pin torch's thread count (the same for every side); on a shared machine
oversubscribed threads make every figure noisy. The bf16 sides run where bf16 is native (a GPU,
a CPU with AMX or AVX512-BF16; `--dtypes` overrides): emulated bf16 on other CPUs is many times
slower than fp32 on both sides alike and would make the run take most of an hour.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_RECORDS = ROOT.parent / "shared" / "data" / "prag_augmented" / "complexwebquestions_llama3.2-1b_46.json"

from dyprag.bank import LoraBank, LoraBankWriter  # noqa: E402
from dyprag.passage_training import (EncodeConfig, default_max_batch_tokens, encode_batch, init_lora,  # noqa: E402
                                     passage_texts, plan_batches)
from dyprag.lora import LoraSpec, module_shapes, save_peft_adapter, target_module_names  # noqa: E402
from bench.sft_throughput import linear_params, matmul_peak  # noqa: E402

SPEC = LoraSpec()


def build_model(work_dir: Path, preset: str) -> Path:
    subprocess.run([sys.executable, "-m", "stages.world", "--output_dir", str(work_dir), "--preset", preset],
                   check=True, cwd=ROOT, capture_output=True)
    return work_dir


def load_texts(tokenizer, data_dir: Path, count: int, cutoff: int, source: str) -> tuple[list[list[list[int]]], str]:
    """`count` passages' PRAG training texts (source auto: the real records when present)."""
    from dyprag.records import detect_augment_model

    if source == "real" and not REAL_RECORDS.is_file():
        raise SystemExit(f"--source real: {REAL_RECORDS} is absent")
    if source != "demo" and REAL_RECORDS.is_file():
        records = json.loads(REAL_RECORDS.read_text())
        name = detect_augment_model(records)
        entries = [(a["passage"], a[f"{name}_rewrite"], a[f"{name}_qa"]) for r in records for a in r["augment"]]
        source = f"{REAL_RECORDS.name} (passage, rewrite, QA)"
    else:  # the gold passage of each demo entity, its questions as QA pairs, sentences reversed as rewrite
        by_passage: dict[str, list[dict]] = {}
        for record in json.loads((data_dir / "demo_qa.json").read_text()):
            by_passage.setdefault(record["passages"][0], []).append(
                {"question": record["question"], "answer": record["answer"][0]})
        entries = [(p, " ".join(reversed(p.split(". "))), qas) for p, qas in by_passage.items()]
        source = "embedded demo_qa (its QA pairs, sentence-reversed rewrites)"
    if len(entries) < count:
        raise SystemExit(f"only {len(entries)} passages available, asked for {count}")
    return [passage_texts(tokenizer, p, rw, qa, max_length=cutoff) for p, rw, qa in entries[:count]], source


def sequential_peft(model, init_dir: Path, texts, config: EncodeConfig, pad_id: int, out_dir: Path,
                    pad_to: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The original loop: one passage at a time through peft (pad_to=3000 reproduces its padding)."""
    from peft import PeftModel

    states, device = [], next(model.parameters()).device
    for index, passage in enumerate(texts):
        peft_model = PeftModel.from_pretrained(model, str(init_dir), is_trainable=True)
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                      lr=config.learning_rate)
        for _ in range(config.num_epochs):
            for text in passage:
                width = pad_to or len(text)
                ids = torch.tensor([text + [pad_id] * (width - len(text))], device=device)
                mask = torch.tensor([[1] * len(text) + [0] * (width - len(text))], device=device)
                optimizer.zero_grad()
                peft_model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
                optimizer.step()
        peft_model.save_pretrained(str(out_dir / f"passage_{index}"))
        states.append({k: v.detach().float().clone() for k, v in peft_model.state_dict().items() if "lora_" in k})
        model = peft_model.unload()
    return states


def batched(model, init, texts, config: EncodeConfig, pad_id: int, per_batch: int, bank_dir: Path):
    shutil.rmtree(bank_dir, ignore_errors=True)
    weights: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    with LoraBankWriter(bank_dir, SPEC, "bench") as writer:
        for batch in plan_batches([sum(map(len, t)) for t in texts], per_batch):
            result = encode_batch(model, SPEC, init, [texts[i] for i in batch], config, pad_id)
            for row, i in enumerate(batch):
                writer.add(str(i), result.weights, row)
                weights[i] = {n: (a[row], b[row]) for n, (a, b) in result.weights.items()}
    return [weights[i] for i in range(len(texts))]


def max_difference(states, reference) -> float:
    """Largest |A - A_ref|, |B - B_ref| over passages (states: peft state dicts or per-module (A, B))."""
    worst = 0.0
    for state, ref in zip(states, reference):
        for key, value in ref.items():
            name = key.removeprefix("base_model.model.").split(".lora_")[0]
            part = 0 if ".lora_A." in key else 1
            ours = state[name][part] if name in state else state[key]
            worst = max(worst, (ours.float() - value).abs().max().item())
    return worst


def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def timed(fn):
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def bench_encoding(args, model_dir: Path, work: Path) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id
    texts, source = load_texts(tokenizer, model_dir.parent / "data", args.passages, args.cutoff_len, args.source)
    fp32 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    fp32.to(args.device)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    config = EncodeConfig(max_batch_tokens=args.max_batch_tokens or default_max_batch_tokens(args.device))
    init = init_lora(fp32, SPEC, seed=42)
    init_dir = save_peft_adapter(init, 0, SPEC, str(model_dir), work / "init")
    tokens = [sum(len(t) - 1 for t in passage) for passage in texts]
    # Model FLOPs per trained token: the frozen linear layers' forward (2N) and their input
    # gradients (2N; frozen weights get none). LoRA's own products and attention scores are left out.
    flops_per_token = 4 * linear_params(model_dir)
    print(f"model {model_dir} ({sum(p.numel() for p in fp32.parameters()) / 1e6:.1f}M parameters), "
          f"{len(texts)} passages from {source}, {sum(map(len, texts))} texts, {sum(tokens)} tokens, "
          f"device {args.device}, threads {torch.get_num_threads()}", flush=True)

    sides = {  # peft fp32 first: it is the reference of the check column
        "peft fp32": lambda t, out: sequential_peft(fp32, init_dir, t, config, pad_id, out),
        "original (peft, fp32, pad 3000)": lambda t, out: sequential_peft(fp32, init_dir, t, config, pad_id, out,
                                                                          pad_to=3000),
        "peft bf16": lambda t, out: sequential_peft(bf16, init_dir, t, config, pad_id, out),
        "batched fp32": lambda t, out: batched(fp32, init, t, config, pad_id, args.passages_per_batch, out),
        "batched bf16": lambda t, out: batched(bf16, init, t, config, pad_id, args.passages_per_batch, out),
    }
    rows, reference = [], None
    for name, run in sides.items():
        if name in args.skip or name.split()[-1] == "bf16" and "bf16" not in args.dtypes:
            continue
        original = name.startswith("original")
        count = args.original_passages if original else len(texts)
        if name.startswith("batched"):  # GPU: every batch shape once (kernel selection); CPU: code paths
            run(texts if args.device != "cpu" else texts[:4], work / "warmup")
        elif not original:  # the original's 3000-token steps run on the code path peft fp32 warmed up
            run(texts[:1], work / "warmup")
        seconds, states = timed(partial(run, texts[:count], work / name.split()[0]))
        if name == "peft fp32":
            reference = states
        rows.append({"side": name, "passages": count, "seconds": seconds, "passages_per_s": count / seconds,
                     "tokens_per_s": sum(tokens[:count]) / seconds,
                     "model_flops_per_s": flops_per_token * sum(tokens[:count]) / seconds,
                     "max_diff_to_peft_fp32": max_difference(states, reference[:count]) if reference else None})
        print(f"  {name}: {count} passages in {seconds:.1f} s", flush=True)
    return rows


def bench_loading(args, model_dir: Path, work: Path) -> list[dict]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    shapes = module_shapes(model, target_module_names(model, SPEC))
    generator = torch.Generator().manual_seed(0)
    bank_dir, folders = work / "load_bank", work / "load_adapters"
    shutil.rmtree(bank_dir, ignore_errors=True)
    ids = [str(i) for i in range(args.bank_size)]
    with LoraBankWriter(bank_dir, SPEC, str(model_dir)) as writer:
        for pid in ids:
            writer.add(pid, {n: (torch.randn(1, SPEC.rank, i, generator=generator),
                                 torch.randn(1, o, SPEC.rank, generator=generator)) for n, (i, o) in shapes.items()})
    chosen = random.Random(0).sample(ids, args.load_count)
    bank = LoraBank(bank_dir)
    for pid in chosen:
        bank.export_peft(pid, folders / pid)

    def original_style():  # per passage, as PRAG's inference: wrap, load, unwrap
        base = model
        for pid in chosen:
            peft_model = PeftModel.from_pretrained(base, str(folders / pid), adapter_name=pid)
            base = peft_model.unload()

    def load_adapter_style():
        peft_model = PeftModel.from_pretrained(model, str(folders / chosen[0]), adapter_name=chosen[0])
        for pid in chosen[1:]:
            peft_model.load_adapter(str(folders / pid), adapter_name=pid)
        peft_model.unload()

    warm_bank = LoraBank(bank_dir)
    warm_bank.load(chosen)
    cases = {
        f"{args.load_count} peft folders: from_pretrained + unload each": original_style,
        f"{args.load_count} peft folders: one PeftModel + load_adapter": load_adapter_style,
        f"bank.load({args.load_count}) cold (open + sha256 + gather)": lambda: LoraBank(bank_dir).load(chosen),
        f"bank.load({args.load_count}) warm (mapped, cached)": lambda: warm_bank.load(chosen),
    }
    rows = []
    for name, fn in cases.items():
        times = [timed(fn)[0] for _ in range(args.load_repeats)]
        rows.append({"case": name, "seconds": sorted(times)[len(times) // 2]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default="/tmp/encode_bench", help="model build and scratch folder")
    parser.add_argument("--preset", default="bench", choices=["tiny", "bench"], help="stages.world preset")
    parser.add_argument("--passages", type=int, default=32, help="passages encoded by each side")
    parser.add_argument("--source", default="auto", choices=["auto", "real", "demo"],
                        help="texts: the real PRAG records (auto: when present) or the embedded demo_qa; the bench "
                             "tokenizer, trained on the demo world, cuts real text into ~3x more tokens")
    parser.add_argument("--original_passages", type=int, default=1, help="passages for the (slow) original loop")
    parser.add_argument("--passages_per_batch", type=int, default=32, help="batched: passages per forward/backward")
    parser.add_argument("--max_batch_tokens", type=int, default=None,
                        help="batched: padded tokens per forward (default: the stage's, 16384 on cuda, 4096 on cpu)")
    parser.add_argument("--cutoff_len", type=int, default=3000, help="tokens kept per training text")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="where the encoding sides run (cpu, cuda); loading is on cpu")
    parser.add_argument("--skip", nargs="*", default=[], help="sides to leave out, by name")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated: fp32, bf16 (default: both on a GPU or a CPU with native bf16 "
                             "(AMX / AVX512-BF16), fp32 alone elsewhere: emulated bf16 takes many minutes and "
                             "says nothing about the method)")
    parser.add_argument("--bank_size", type=int, default=256, help="LoRAs in the bank of the loading bench")
    parser.add_argument("--load_count", type=int, default=64, help="LoRAs loaded per batch")
    parser.add_argument("--load_repeats", type=int, default=3, help="loading: median over this many runs")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.dtypes is None:
        args.dtypes = "fp32,bf16" if args.device != "cpu" or native_cpu_bf16() else "fp32"
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    model_dir = build_model(work / args.preset, args.preset) / "model"

    # Each side against the best matrix product of its own dtype on this CPU (none on an accelerator),
    # measured before and after the encoding: on a shared host one measurement can read half the peak.
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {name: matmul_peak(dtypes[name]) for name in args.dtypes.split(",")} if args.device == "cpu" else {}
    encoding = bench_encoding(args, model_dir, work)
    peaks = {name: max(peak, matmul_peak(dtypes[name])) for name, peak in peaks.items()}
    print(f"\n{'encoding side':34} {'passages':>8} {'seconds':>8} {'passages/s':>10} {'tokens/s':>9} "
          f"{'GFLOP/s':>8} {'% peak':>6} {'max|dW| vs peft':>15}")
    for row in encoding:
        diff = "-" if row["max_diff_to_peft_fp32"] is None else f"{row['max_diff_to_peft_fp32']:.1e}"
        peak = peaks.get("bf16" if row["side"].endswith("bf16") else "fp32")
        share = f"{100 * row['model_flops_per_s'] / peak:6.1f}" if peak else f"{'-':>6}"
        print(f"{row['side']:34} {row['passages']:8d} {row['seconds']:8.1f} {row['passages_per_s']:10.3f} "
              f"{row['tokens_per_s']:9.0f} {row['model_flops_per_s'] / 1e9:8.1f} {share} {diff:>15}")
    if peaks:
        print("  % peak: model FLOP/s (4 x linear parameters x tokens/s) over this CPU's matmul peak in the side's "
              f"dtype, {', '.join(f'{d} {p / 1e9:.0f}' for d, p in peaks.items())} GFLOP/s (bench/sft_throughput.py)")
    rate = {row["side"]: row["passages_per_s"] for row in encoding}
    for ours in ("batched fp32", "batched bf16"):
        for theirs in ("peft fp32", "peft bf16", "original (peft, fp32, pad 3000)"):
            if ours in rate and theirs in rate:
                print(f"  {ours} / {theirs}: {rate[ours] / rate[theirs]:.1f}x")

    loading = bench_loading(args, model_dir, work)
    print(f"\n{'loading LoRAs for one batch':58} {'seconds':>8}")
    for row in loading:
        print(f"{row['case']:58} {row['seconds']:8.4f}")
    for peft_row in loading[:2]:
        for bank_row in loading[2:]:
            print(f"  [{peft_row['case']}] / [{bank_row['case']}]: {peft_row['seconds'] / bank_row['seconds']:.0f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"encoding": encoding, "loading": loading,
                                               "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
