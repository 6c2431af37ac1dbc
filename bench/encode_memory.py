"""PRAG encoding on the real model: peak RSS and passages/s of the full-logits loss (before) and the chunked one
(after).

    python bench/encode_memory.py [--passages 32] [--repeats 3] [--threads 2] [--json out.json]

Both sides train the same real passages' LoRAs (../shared/data/prag_augmented: passage, rewrite,
QA pairs; the PRAG texts of dyprag.passage_training) on SmolLM2-135M-Instruct (`stages.core.pretrained`, fp32,
30 layers, vocabulary 49152) from one seeded init, `--passages_per_batch` passages per batch, as
the stage does at its CPU defaults:
- before: the loss from the model's own logits (every position's [tokens, vocabulary] fp32
  logits, their log-softmax and its gradient held at once; `dyprag.passage_training.loss_head` patched to
  None, which is the path a model with post-processed logits takes) and 4096 padded tokens per
  forward, the largest forward the full logits fit in at this speed.
- after: dyprag.passage_training as it is: the labelled positions' hidden states through the LM head and
  the cross-entropy a chunk at a time (`linear_cross_entropy`) and the CPU default tokens per forward.
Each run is a fresh process (its own `ru_maxrss`: model loading included, which peaks far below
the training); the sides alternate, `--repeats` times, and the table gives medians with ranges.
"max|dW|" is the largest difference of the after side's LoRA weights to the before side's
(float rounding: the two losses sum in different orders).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import REAL_RECORDS, ROOT  # noqa: E402
BEFORE_MAX_BATCH_TOKENS = 4096  # padded tokens per forward of the full-logits side
SIDES = ("before", "after")


def run_side(args: argparse.Namespace) -> dict:
    """One side in this process: load, encode every batch, report seconds and peak RSS; save the LoRAs."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dyprag.passage_training as passage_training
    from dyprag.lora import LoraSpec
    from dyprag.records import detect_augment_model
    from stages.core.pretrained import smollm2_folder

    torch.set_num_threads(args.threads)
    model_dir = args.model or str(smollm2_folder())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = json.loads(REAL_RECORDS.read_text())
    name = detect_augment_model(records)
    entries = [(a["passage"], a[f"{name}_rewrite"], a[f"{name}_qa"]) for r in records for a in r["augment"]]
    texts = [passage_training.passage_texts(tokenizer, *entry) for entry in entries[:args.passages]]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    spec = LoraSpec()
    init = passage_training.init_lora(model, spec, seed=42)
    if args.side == "before":
        passage_training.loss_head = lambda model: None
    config = passage_training.EncodeConfig(max_batch_tokens=BEFORE_MAX_BATCH_TOKENS if args.side == "before"
                                 else args.max_batch_tokens or passage_training.default_max_batch_tokens("cpu"))
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    weights = {}
    start = time.perf_counter()
    for batch in passage_training.plan_batches([sum(map(len, t)) for t in texts], args.passages_per_batch):
        result = passage_training.encode_batch(model, spec, init, [texts[i] for i in batch], config,
                                               tokenizer.pad_token_id)
        for row, i in enumerate(batch):
            weights.update({f"{i}.{module}.{part}": result.weights[module][part][row].contiguous()
                            for module in result.weights for part in (0, 1)})
    seconds = time.perf_counter() - start
    save_file(weights, args.weights)
    return {"side": args.side, "passages": len(texts), "tokens": passage_training.training_tokens(texts, config),
            "max_batch_tokens": config.max_batch_tokens, "seconds": seconds, "passages_per_s": len(texts) / seconds,
            "loaded_rss_mib": loaded_rss, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def max_difference(first: Path, second: Path) -> float:
    from safetensors.torch import load_file

    a, b = load_file(first), load_file(second)
    return max((a[key] - b[key]).abs().max().item() for key in a)


def summary(values: list[float], digits: int) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=int, default=32, help="real passages encoded by each run")
    parser.add_argument("--passages_per_batch", type=int, default=32, help="the stage's default")
    parser.add_argument("--max_batch_tokens", type=int, default=None,
                        help="after: padded tokens per forward (default: dyprag.passage_training's CPU default)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, alternating")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated: before, after")
    parser.add_argument("--model", default=None, help="HF folder (default: stages.core.pretrained's SmolLM2-135M)")
    parser.add_argument("--work_dir", default="/tmp/encode_memory", help="the runs' LoRA weights")
    parser.add_argument("--json", default=None, help="also write every run's figures here")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child run
    parser.add_argument("--weights", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not REAL_RECORDS.is_file():
        raise SystemExit(f"{REAL_RECORDS} is absent: this bench encodes the real PRAG records")
    if args.side:
        print(json.dumps(run_side(args)))
        return

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    sides = [s for s in args.sides.split(",") if s]
    runs: list[dict] = []
    for repeat in range(args.repeats):
        for side in sides:
            weights = work / f"{side}-{repeat}.safetensors"
            child = [sys.executable, __file__, "--side", side, "--weights", str(weights), "--passages",
                     str(args.passages), "--passages_per_batch", str(args.passages_per_batch), "--threads",
                     str(args.threads), *(["--model", args.model] if args.model else []),
                     *(["--max_batch_tokens", str(args.max_batch_tokens)] if args.max_batch_tokens else [])]
            done = subprocess.run(child, check=True, capture_output=True, text=True, cwd=ROOT)
            runs.append({**json.loads(done.stdout.strip().splitlines()[-1]), "repeat": repeat,
                         "weights": str(weights)})
            row = runs[-1]
            print(f"  {side} #{repeat + 1}: {row['seconds']:.1f} s, {row['passages_per_s']:.4f} passages/s, "
                  f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)

    first = runs[0]
    print(f"\n{first['passages']} real passages ({first['tokens']} trained tokens), SmolLM2-135M fp32, "
          f"{args.passages_per_batch} passages per batch, {args.threads} threads, {args.repeats} runs per side "
          f"(median (min-max))")
    print(f"{'side':8} {'tokens/forward':>14} {'peak RSS MiB':>22} {'RSS after load MiB':>20} "
          f"{'passages/s':>24} {'max|dW| vs before':>18}")
    reference = next((r["weights"] for r in runs if r["side"] == "before"), None)
    for side in sides:
        mine = [r for r in runs if r["side"] == side]
        diff = f"{max_difference(Path(reference), Path(mine[0]['weights'])):.1e}" if reference else "-"
        print(f"{side:8} {mine[0]['max_batch_tokens']:14d} {summary([r['peak_rss_mib'] for r in mine], 0):>22} "
              f"{summary([r['loaded_rss_mib'] for r in mine], 0):>20} "
              f"{summary([r['passages_per_s'] for r in mine], 4):>24} {diff:>18}")
    if set(SIDES) <= set(sides):
        rate = {s: statistics.median(r["passages_per_s"] for r in runs if r["side"] == s) for s in SIDES}
        rss = {s: statistics.median(r["peak_rss_mib"] for r in runs if r["side"] == s) for s in SIDES}
        print(f"  after / before: peak RSS {rss['after'] / rss['before']:.2f}x, passages/s "
              f"{rate['after'] / rate['before']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
