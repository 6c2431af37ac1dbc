"""PRAG encoding throughput: batched per-passage LoRA training against sequential peft loops; bank loading.

    python bench/encode_throughput.py [--preset smollm2|bench] [--passages 8] [--repeats 3] ...

Encoding. Every side trains the same passages' LoRAs (r=2, alpha=32 on gate/up/down of every
layer) from the same saved initialisation with the same recipe (dyprag.passage_training: the PRAG texts
of each passage, AdamW lr 3e-4, one text per step, one epoch) on the same model (the real pretrained
SmolLM2-135M-Instruct by default, `--preset bench` the ~20M random bench model). Texts: the real
PRAG records in ../shared/data/prag_augmented when present (their passages, rewrites and QA),
else (or with --source demo) the embedded demo_qa gold passages with their questions as QA
pairs and the sentences in reverse order as the rewrite.
- original: the original PRAG loop (src/encode.py): per passage `PeftModel.from_pretrained`
  of the shared init, torch AdamW, batch 1, every text padded to 3000 tokens, fp32,
  `save_pretrained`, `unload`. Slow, so timed on the first `--original_passages` passages (at
  least 4).
- peft fp32 / peft bf16: the same loop without the padding (each text at its own length),
  the base in fp32 or bf16: the strongest sequential baseline. Timed on all passages.
- batched fp32 / batched bf16: dyprag.passage_training.encode_batch, `--passages_per_batch` passages
  per batched forward/backward, written to a LoRA bank (the write is timed too).
Warm-up, untimed, once before the repeats: the batched sides run the whole set on a GPU (each
batch shape selects its kernels once) and four passages on a CPU (no per-shape kernel choice
there: code paths and allocator only), the peft sides one passage. Then every side encodes its
set end to end, the sides in alternating order, `--repeats` times; figures are medians with the
range of the repeats, and a ratio pairs two sides' runs of the same repeat. "passages/s"
= passages / wall seconds; "tokens/s" counts the real (unpadded) tokens trained on. The
GFLOP/s column is the model FLOPs each side does per second on real tokens (4 x the linear
layers' parameters per token: forward and input gradients of the frozen layers), and "MFU%"
sets it against this machine's best matrix product in the side's dtype (bench/measure.py's
`matmul_peak`, measured before and after the runs, the better of the two): where the sequential
loop already runs near that peak, no batching can beat it by much, since both sides do the same
products. The check column is the largest
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
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import (DTYPES, PRESET_HELP, PRESETS, REAL_RECORDS, alternate, linear_params,  # noqa: E402
                           machine_line, matmul_peak, native_cpu_bf16, profile, spread, sync, world)
from dyprag.bank import LoraBank, LoraBankWriter  # noqa: E402
from dyprag.passage_training import (EncodeConfig, default_max_batch_tokens, encode_batch, init_lora,  # noqa: E402
                                     passage_texts, plan_batches)
from dyprag.lora import LoraSpec, module_shapes, save_peft_adapter, target_module_names  # noqa: E402

SPEC = LoraSpec()


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


def timed(fn):
    start = time.perf_counter()
    result = fn()
    sync()
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
    flops_per_token = 4 * linear_params(fp32)
    print(f"model {model_dir.resolve()} ({sum(p.numel() for p in fp32.parameters()) / 1e6:.1f}M parameters), "
          f"{len(texts)} passages from {source}, {sum(map(len, texts))} texts, {sum(tokens)} tokens, "
          f"device {args.device}, threads {torch.get_num_threads()}, {config.max_batch_tokens} tokens per batched "
          f"forward", flush=True)

    sides = {  # peft fp32 first: it is the reference of the check column
        "peft fp32": lambda t, out: sequential_peft(fp32, init_dir, t, config, pad_id, out),
        "original (peft, fp32, pad 3000)": lambda t, out: sequential_peft(fp32, init_dir, t, config, pad_id, out,
                                                                          pad_to=3000),
        "peft bf16": lambda t, out: sequential_peft(bf16, init_dir, t, config, pad_id, out),
        "batched fp32": lambda t, out: batched(fp32, init, t, config, pad_id, args.passages_per_batch, out),
        "batched bf16": lambda t, out: batched(bf16, init, t, config, pad_id, args.passages_per_batch, out),
    }
    sides = {name: run for name, run in sides.items()
             if name not in args.skip and not (name.endswith("bf16") and "bf16" not in args.dtypes)}
    counts = {name: args.original_passages if name.startswith("original") else len(texts) for name in sides}
    for name, run in sides.items():
        if name.startswith("batched"):  # GPU: every batch shape once (kernel selection); CPU: code paths
            run(texts if args.device != "cpu" else texts[:4], work / "warmup")
        elif not name.startswith("original"):  # the original's 3000-token steps run on peft fp32's code path
            run(texts[:1], work / "warmup")
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    checks = {}  # each side's LoRAs of the first repeat
    for repeat in range(args.repeats):
        for name in alternate(list(sides), repeat):
            took, states = timed(partial(sides[name], texts[: counts[name]], work / name.split()[0]))
            seconds[name].append(took)
            checks.setdefault(name, states)
            print(f"  repeat {repeat + 1}: {name}: {counts[name]} passages in {took:.1f} s", flush=True)
    if args.profile:
        print(f"\n{args.profile}, {counts[args.profile]} passages under torch.profiler:")
        profile(partial(sides[args.profile], texts[: counts[args.profile]], work / "profile"))
    rows = []
    for name in sides:
        count, times = counts[name], seconds[name]
        reference = checks.get("peft fp32")
        diff = max_difference(checks[name], reference[:count]) if reference is not None else None
        rows.append({"side": name, "passages": count, "seconds": times,
                     "passages_per_s": [count / t for t in times],
                     "tokens_per_s": [sum(tokens[:count]) / t for t in times],
                     "model_flops_per_s": [flops_per_token * sum(tokens[:count]) / t for t in times],
                     "max_diff_to_peft_fp32": diff})
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
        rows.append({"case": name, "seconds": [timed(fn)[0] for _ in range(args.load_repeats)]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="smollm2", choices=PRESETS, help=PRESET_HELP)
    parser.add_argument("--work_dir", default="/tmp/encode_bench", help="model build and scratch folder")
    parser.add_argument("--passages", type=int, default=8, help="passages encoded by each side")
    parser.add_argument("--source", default="auto", choices=["auto", "real", "demo"],
                        help="texts: the real PRAG records (auto: when present) or the embedded demo_qa; the bench "
                             "tokenizer, trained on the demo world, cuts real text into ~3x more tokens")
    parser.add_argument("--original_passages", type=int, default=4, help="passages for the (slow) original loop")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, in alternating order")
    parser.add_argument("--passages_per_batch", type=int, default=32, help="batched: passages per forward/backward")
    parser.add_argument("--max_batch_tokens", type=int, default=None,
                        help="batched: padded tokens per forward (default: the stage's, 16384 on cuda, 512 on cpu)")
    parser.add_argument("--cutoff_len", type=int, default=3000, help="tokens kept per training text")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the encoding sides run (cpu, cuda); loading is on cpu")
    parser.add_argument("--skip", nargs="*", default=[], help="sides to leave out, by name")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated: fp32, bf16 (default: both on a GPU or a CPU with native bf16 "
                             "(AMX / AVX512-BF16), fp32 alone elsewhere: emulated bf16 takes many minutes and "
                             "says nothing about the method)")
    parser.add_argument("--bank_size", type=int, default=256, help="LoRAs in the bank of the loading bench")
    parser.add_argument("--load_count", type=int, default=64, help="LoRAs loaded per batch")
    parser.add_argument("--load_repeats", type=int, default=3, help="loading: runs per case")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--profile", default=None, help="also run this side (by name) once under torch.profiler "
                                                        "and print where its time goes")
    args = parser.parse_args()
    if args.original_passages < 4 or args.passages < args.original_passages or args.repeats < 1:
        parser.error("--original_passages must be >= 4 and <= --passages, --repeats >= 1")
    if args.dtypes is None:
        args.dtypes = "fp32,bf16" if args.device != "cpu" or native_cpu_bf16() else "fp32"
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    model_dir = world(work, args.preset) / "model"
    header = machine_line(args.threads)

    # Each side against the best matrix product of its own dtype on this machine, measured before and
    # after the encoding: on a shared host one measurement can read half the peak.
    # --dtypes only adds the bf16 sides: the fp32 ones (the original among them) always have a row.
    measured = ["fp32", "bf16"] if "bf16" in args.dtypes else ["fp32"]
    peaks = {name: matmul_peak(DTYPES[name], args.device) for name in measured}
    encoding = bench_encoding(args, model_dir, work)
    peaks = {name: max(peak, matmul_peak(DTYPES[name], args.device)) for name, peak in peaks.items()}
    print(f"\n{header}\n{args.repeats} repeats; matmul peak "
          f"{', '.join(f'{d} {p / 1e9:.0f}' for d, p in peaks.items())} GFLOP/s; medians (min-max)")
    print(f"{'encoding side':34} {'passages':>8} {'passages/s':>22} {'tokens/s':>8} {'GFLOP/s':>8} {'MFU%':>20} "
          f"{'max|dW| vs peft':>15}")
    for row in encoding:
        diff = "-" if row["max_diff_to_peft_fp32"] is None else f"{row['max_diff_to_peft_fp32']:.1e}"
        peak = peaks["bf16" if row["side"].endswith("bf16") else "fp32"]
        share = spread([100 * f / peak for f in row["model_flops_per_s"]], 1)
        print(f"{row['side']:34} {row['passages']:8d} {spread(row['passages_per_s'], 3):>22} "
              f"{statistics.median(row['tokens_per_s']):8.0f} {statistics.median(row['model_flops_per_s']) / 1e9:8.1f} "
              f"{share:>20} {diff:>15}")
    print("  MFU: model FLOP/s (4 x linear parameters x tokens/s) over the matmul peak of the side's dtype")
    rate = {row["side"]: row["passages_per_s"] for row in encoding}
    for ours in ("batched fp32", "batched bf16"):
        for theirs in ("peft fp32", "peft bf16", "original (peft, fp32, pad 3000)"):
            if ours in rate and theirs in rate:
                print(f"  {ours} / {theirs}: {spread([a / b for a, b in zip(rate[ours], rate[theirs])], 1)}x")

    loading = bench_loading(args, model_dir, work)
    print(f"\n{'loading LoRAs for one batch':58} {'seconds, median (min-max)':>28}")
    for row in loading:
        print(f"{row['case']:58} {spread(row['seconds'], 4):>28}")
    for peft_row in loading[:2]:
        for bank_row in loading[2:]:
            ratio = statistics.median(peft_row["seconds"]) / statistics.median(bank_row["seconds"])
            print(f"  [{peft_row['case']}] / [{bank_row['case']}]: {ratio:.0f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"encoding": encoding, "loading": loading,
                                               "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
