"""Online cost per question: DyPRAG against PRAG with encoding at question time and standard RAG.

    python bench/online_cost.py [--preset smollm2|bench] [--source auto|real|demo] [--questions 16] ...

Every method answers the same questions one at a time (batch 1, as a question arrives), greedy, exactly
--new_tokens new tokens each (`min_new_tokens` = `max_new_tokens` on the model's generation config, so
an early end-of-sequence cannot make one method look cheaper), with the top --top_k passages of each
question, on the same model (the real pretrained SmolLM2-135M-Instruct by default, `--preset bench`
the ~20M random bench model), in the same precision (`--bf16`), through our real code paths:
`dyprag.inference.answer_questions` with the `stages.prag_eval` providers.

- RAG: the passages in the prompt, no LoRA (method `rag`).
- DyPRAG: the projector reads the passages and writes their LoRAs (`ProjectorLoras`: one batched
  forward of the frozen model over the k passages, the projector, `combine_loras` "factors"), which
  are injected (`inject_lora`) while the model answers the question alone (method `dyprag`). The
  projector is freshly initialised (seeded) and loaded the way prag_eval loads a trained one
  (`save_projector`, then `dyprag.projector_model.load_projector_loras`): its cost depends on its shapes, not
  on its weights, and the answer length is fixed.
- PRAG at question time (`--methods ...,prag`; not run by default: on the real model it trains
  15 texts per question and takes most of the run): the k passages' LoRAs trained now with our batched encoder
  (`dyprag.passage_training.passage_texts` + `encode_batch`, the PRAG recipe: AdamW lr 3e-4, one text per step,
  one epoch, k passages per batched step), written to a bank (`LoraBankWriter`), read back by
  prag_eval's `BankLoras` (summed) and injected while the model answers the question alone (method
  `prag`). The augmentation (rewrite + QA pairs per passage) is taken as already available: an LLM
  writing it at question time would add several generations per passage, which is not counted here.
- vanilla (reference): the question alone, no LoRA: separates DyPRAG's injected-LoRA cost from its
  shorter prompt.

Questions: the real PRAG records in ../shared/data/prag_augmented when present (their passages and
augmentation), else (or with --source demo) the embedded demo_qa test questions (gold passage + two
distractors) with each passage's demo_qa questions as QA pairs and its sentences reversed as rewrite.

Timing: per method, the wall time of answering all questions (the LoRA work included), divided by
the number of questions; the part spent turning passages into LoRAs is timed on its own (the provider
call inside `answer_questions`, plus the encoding for PRAG). Every method answers one question untimed
first; the methods run in alternating order, `--repeats` times; figures are medians with the range
of the repeats, and a ratio pairs two methods' runs of the same repeat.

MFU: nominal model FLOPs per question, 2N per token the model reads or writes (the prompt, the
--new_tokens answer tokens and, for DyPRAG, the passages its projector reads), N = the linear
layers' parameters, over s/question and the matmul peak of the run's dtype measured in this run.
Answering at batch 1 is bound by memory bandwidth and per-step overhead, not by the matmul peak:
the column says how far from the compute limit a question is. PRAG's is left out (its training
steps are another kind of work).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import (PRESET_HELP, PRESETS, REAL_RECORDS, alternate, linear_params,  # noqa: E402
                           machine_line, matmul_peak, native_cpu_bf16, spread, sync, world)

from dyprag.bank import LoraBank, LoraBankWriter  # noqa: E402
from dyprag.passage_training import EncodeConfig, encode_batch, init_lora, passage_texts  # noqa: E402
from dyprag.inference import METHODS, BankLoras, answer_questions  # noqa: E402
from dyprag.lora import LoraSpec  # noqa: E402
from dyprag.prompts import get_prompt  # noqa: E402
from dyprag.records import collect_passages, detect_augment_model  # noqa: E402
from dyprag.projector_model import Projector, ProjectorConfig, load_projector_loras, save_projector  # noqa: E402
from stages.core.arguments import FinetuningArguments, ModelArguments  # noqa: E402
from stages.core.loader import get_compute_dtype, load_model, load_tokenizer  # noqa: E402
from stages.core.distributed import local_device  # noqa: E402

SPEC = LoraSpec()
SIDES = {"rag": "RAG (passages in context)", "dyprag": "DyPRAG (projector + inject, question only)",
         "prag": "PRAG at question time (encode + inject)", "vanilla": "vanilla (question only; reference)"}


def load_questions(args: argparse.Namespace, model_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """--questions records with their first --top_k passages and each passage's augmentation."""
    if args.source == "real" and not REAL_RECORDS.is_file():
        raise SystemExit(f"--source real: {REAL_RECORDS} is absent")
    if args.source != "demo" and REAL_RECORDS.is_file():
        records = json.loads(REAL_RECORDS.read_text())[: args.questions]
        source = f"{REAL_RECORDS.name} (passages, rewrites, QA pairs)"
    else:  # demo_qa test questions; every passage's QA pairs = the questions whose gold passage it is
        demo = json.loads((model_dir.parent / "data" / "demo_qa.json").read_text())
        qas: dict[str, list[dict[str, str]]] = {}
        for record in demo:
            qas.setdefault(record["passages"][0], []).append({"question": record["question"],
                                                              "answer": record["answer"][0]})
        records = [{**r, "augment": [{"pid": pid, "passage": p, "demo_rewrite": " ".join(reversed(p.split(". "))),
                                      "demo_qa": qas.get(p, [])} for pid, p in enumerate(r["passages"])]}
                   for r in demo if r["split"] == "test"][: args.questions]
        source = "embedded demo_qa test split (gold + 2 distractors; demo_qa questions as QA, reversed rewrite)"
    if len(records) < args.questions:
        raise SystemExit(f"only {len(records)} questions available, asked for {args.questions}")
    for record in records:
        record["passages"] = record["passages"][: args.top_k]
        record["augment"] = [a for a in record["augment"] if a["pid"] < args.top_k]
    return records, source


class Timed:
    """A LoRA provider that adds the wall time of its calls to `seconds`."""

    def __init__(self, provider: Any) -> None:
        self.provider, self.scaling, self.seconds = provider, provider.scaling, 0.0

    def __call__(self, records):
        start = time.perf_counter()
        weights = self.provider(records)
        sync()
        self.seconds += time.perf_counter() - start
        return weights


@dataclass
class Context:
    model: Any
    tokenizer: Any
    args: argparse.Namespace
    model_dir: Path
    augment_name: str
    dyprag: Any  # ProjectorLoras
    init: Any  # the shared initial LoRA of PRAG encoding (stages.encode writes it once per bank)
    dtype: torch.dtype
    device: torch.device
    recipe: EncodeConfig = field(default_factory=EncodeConfig)

    def encode_now(self, record: dict[str, Any]) -> LoraBank:
        """PRAG at question time: train the record's passages' LoRAs in one batch; a bank holding them."""
        passages = collect_passages([record], self.augment_name)
        texts = [passage_texts(self.tokenizer, p.text, p.rewrite, p.qas, max_length=self.recipe.max_length)
                 for p in passages]
        result = encode_batch(self.model, SPEC, self.init, texts, self.recipe, self.tokenizer.pad_token_id)
        folder = self.args.work_dir / "question_bank"
        shutil.rmtree(folder, ignore_errors=True)
        with LoraBankWriter(folder, SPEC, str(self.model_dir)) as writer:
            for row, passage in enumerate(passages):
                writer.add(passage.id, result.weights, row)
        return LoraBank(folder)

    def answer(self, record: dict[str, Any], method: str) -> tuple[float, float]:
        """(seconds turning passages into LoRAs, total seconds) of answering one question with `method`."""
        start = time.perf_counter()
        encoding, provider = 0.0, None
        if method == "prag":
            bank = self.encode_now(record)
            encoding = time.perf_counter() - start
            provider = Timed(BankLoras(bank, self.args.top_k, dtype=self.dtype, device=self.device))
        elif method == "dyprag":
            provider = Timed(self.dyprag)
        answer_questions(self.model, self.tokenizer, [record], METHODS[method], lora=provider, top_k=self.args.top_k,
                         batch_size=1, max_new_tokens=self.args.new_tokens)
        sync()
        return encoding + (provider.seconds if provider else 0.0), time.perf_counter() - start


def build(args: argparse.Namespace, bf16: bool) -> tuple[Context, list[dict[str, Any]], str]:
    model_dir = world(args.work_dir, args.preset) / "model"
    records, source = load_questions(args, model_dir)
    model_args = ModelArguments(model_name_or_path=str(model_dir))
    tokenizer = load_tokenizer(model_args)
    dtype, device = get_compute_dtype(bf16, False), local_device()
    model = load_model(tokenizer, model_args, FinetuningArguments(), is_trainable=False, compute_dtype=dtype)
    model.to(device)
    # Exactly --new_tokens per answer for every method (answer_questions passes max_new_tokens only).
    model.generation_config.min_new_tokens = args.new_tokens
    torch.manual_seed(args.seed)
    projector = Projector(ProjectorConfig.for_model(model, SPEC, base_model_name_or_path=str(model_dir)))
    save_projector(projector, args.work_dir / "projector")
    dyprag = load_projector_loras(args.work_dir / "projector", model, tokenizer, args.top_k, device=device)
    context = Context(model, tokenizer, args, model_dir, detect_augment_model(records),
                      dyprag, init_lora(model, SPEC, seed=args.seed), dtype,
                      device, EncodeConfig(max_batch_tokens=args.max_batch_tokens))
    return context, records, source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2", choices=PRESETS, help=PRESET_HELP)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/online_bench"),
                        help="model (built on first use), the projector, scratch banks")
    parser.add_argument("--source", default="auto", choices=["auto", "real", "demo"],
                        help="questions from the real PRAG records (auto: when present) or the embedded demo_qa")
    parser.add_argument("--questions", type=int, default=16, help="questions answered per method and repeat")
    parser.add_argument("--top_k", type=int, default=3, help="passages per question")
    parser.add_argument("--new_tokens", type=int, default=20, help="tokens generated per answer (prag_eval's "
                                                                   "direct-answer default)")
    parser.add_argument("--methods", default="rag,dyprag,vanilla", help="comma-separated, from " +
                        ", ".join(SIDES))
    parser.add_argument("--repeats", type=int, default=3, help="passes over the questions per method, alternating")
    parser.add_argument("--max_batch_tokens", type=int, default=16384, help="PRAG encoding: padded tokens per "
                                                                            "forward")
    parser.add_argument("--bf16", default="auto", choices=["auto", "true", "false"],
                        help="frozen model in bf16 (auto: on a GPU or a CPU with native bf16)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not set(methods) <= set(SIDES) or not {"rag", "dyprag"} <= set(methods):
        parser.error(f"--methods: rag and dyprag plus any of {', '.join(SIDES)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["TQDM_DISABLE"] = "1"
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    logging.disable(logging.INFO)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started, header = time.perf_counter(), machine_line(args.threads)
    bf16 = args.bf16 == "true" or (args.bf16 == "auto" and (torch.cuda.is_available() or native_cpu_bf16()))
    context, records, source = build(args, bf16)
    peak = matmul_peak(context.dtype, context.device.type)
    prompt = {m: statistics.mean(len(get_prompt(context.tokenizer, r["question"],
                                                r["passages"] if METHODS[m].in_context else None))
                                 for r in records) for m in methods}
    passage_tokens = statistics.mean(sum(len(context.tokenizer(p, add_special_tokens=False)["input_ids"])
                                         for p in r["passages"]) for r in records)
    n = linear_params(context.model)
    flops = {m: 2 * n * (prompt[m] + args.new_tokens + (passage_tokens if m == "dyprag" else 0)) for m in methods}
    print(f"model {context.model_dir.resolve()} ({sum(p.numel() for p in context.model.parameters()) / 1e6:.1f}M "
          f"parameters, {'bf16' if bf16 else 'fp32'}), {len(records)} questions x top-{args.top_k} passages from "
          f"{source}; {args.new_tokens} new tokens per answer, batch 1, device {context.device}", flush=True)

    for method in methods:  # warm-up: code paths, allocator, the bank writer's folder
        context.answer(records[0], method)
    per_question: dict[str, list[float]] = {m: [] for m in methods}
    lora_part: dict[str, list[float]] = {m: [] for m in methods}
    for repeat in range(args.repeats):
        for method in alternate(methods, repeat):
            timings = [context.answer(record, method) for record in records]
            per_question[method].append(sum(total for _, total in timings) / len(records))
            lora_part[method].append(sum(lora for lora, _ in timings) / len(records))
            print(f"  repeat {repeat + 1}: {method:8s} {per_question[method][-1]:.4f} s/question", flush=True)
    peak = max(peak, matmul_peak(context.dtype, context.device.type))

    median = {m: statistics.median(v) for m, v in per_question.items()}
    lora = {m: statistics.median(v) for m, v in lora_part.items()}
    print(f"\n{header}\n{args.repeats} repeats; matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"({'bf16' if bf16 else 'fp32'}); medians (min-max)")
    table = (f"{'method':46s} {'s/question (min-max)':>24s} {'LoRA s':>7s} {'answer s':>8s} {'prompt tok':>10s} "
             f"{'MFU%':>5s}")
    print(table + "\n" + "-" * len(table))
    for method in methods:
        mfu = "-" if method == "prag" else f"{100 * flops[method] / median[method] / peak:5.1f}"
        print(f"{SIDES[method]:46s} {spread(per_question[method], 4):>24s} {lora[method]:7.4f} "
              f"{median[method] - lora[method]:8.4f} {prompt[method]:10.0f} {mfu:>5s}")

    def ratio(a: str, b: str) -> str:  # per repeat, then median (min-max)
        return spread([x / y for x, y in zip(per_question[a], per_question[b])])

    print(f"ratios: DyPRAG / RAG {ratio('dyprag', 'rag')} (goal <= 1.1)" +
          (f", PRAG / RAG {ratio('prag', 'rag')}, PRAG / DyPRAG {ratio('prag', 'dyprag')}" if "prag" in median else ""))
    added = median["dyprag"] - median["rag"]
    print(f"DyPRAG's added cost over RAG: {added:+.4f} s/question = {100 * added / median['rag']:+.1f}% of one RAG "
          f"answer ({median['rag']:.4f} s, {args.new_tokens} tokens); its projector alone: {lora['dyprag']:.4f} s "
          f"= {100 * lora['dyprag'] / median['rag']:.1f}%")
    print(f"(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
