"""Answer questions with or without passages in context and with or without injected LoRAs.

A `Method` is two choices: which LoRA is injected into the frozen model (none, or the name
of a `LoraProvider`), and whether the passages go into the prompt. The part-1 methods:

    vanilla       no LoRA,  no passages       the model's own knowledge
    rag           no LoRA,  passages          standard in-context RAG
    prag          "prag",   no passages       PRAG: the passages' LoRAs only
    prag_combine  "prag",   passages          PRAG-Combine: LoRAs + passages
    dyprag          "dyprag", no passages       DyPRAG: the projector's LoRAs of the passages
    dyprag_combine  "dyprag", passages          DyPRAG-Combine: generated LoRAs + passages

A provider turns a batch of records into one LoRA per record (stacked on the batch axis,
`dyprag.lora` layout) plus its scaling; `BankLoras` is PRAG's: the bank LoRAs of the record's
top-k passages combined with `combine_sum` (the sum of their deltas, i.e. rank concatenation:
what the original's `add_weighted_adapter(..., combination_type="cat", weights=[1]*k)` does).
DyPRAG's provider is `dyprag.projector_model.ProjectorLoras` (the passages through the parameter
projector, combined by averaging; see `dyprag.projector_model.combine_loras`).

Decoding is greedy, batched with left padding; each batch's per-sample LoRAs are injected
with `inject_lora` for the duration of its `generate` call only. Prompts are the original's
(`dyprag.prompts`), answers are scored with `dyprag.scoring` (the original's evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .scoring import SCORE_KEYS, evaluate
from .prompts import get_prompt
from .records import record_passage_ids

if TYPE_CHECKING:
    import torch

    from .lora import LoraWeights


@dataclass(frozen=True)
class Method:
    """An inference method: the LoRA provider injected (None: no LoRA) and passages in context."""

    name: str
    lora: str | None = None
    in_context: bool = False


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("vanilla"), Method("rag", in_context=True), Method("prag", lora="prag"),
    Method("prag_combine", lora="prag", in_context=True), Method("dyprag", lora="dyprag"),
    Method("dyprag_combine", lora="dyprag", in_context=True))}


class LoraProvider(Protocol):
    """One LoRA per record, stacked: A [batch, r, in], B [batch, out, r] per module path."""

    scaling: float

    def __call__(self, records: Sequence[dict[str, Any]]) -> LoraWeights: ...


def stack_loras(loras: Sequence[LoraWeights]) -> LoraWeights:
    """Concatenate single LoRAs ([1, r_i, in] / [1, out, r_i]) on the batch axis.

    Ranks may differ (a record with fewer passages): smaller ones are padded with zero rows of
    A and zero columns of B, which add nothing to the delta B @ A.
    """
    import torch

    out: LoraWeights = {}
    for path in loras[0]:
        rank = max(lora[path][0].shape[1] for lora in loras)
        a_parts, b_parts = [], []
        for lora in loras:
            a, b = lora[path]
            pad = rank - a.shape[1]
            a_parts.append(torch.nn.functional.pad(a, (0, 0, 0, pad)))
            b_parts.append(torch.nn.functional.pad(b, (0, pad)))
        out[path] = (torch.cat(a_parts), torch.cat(b_parts))
    return out


class BankLoras:
    """PRAG's provider: the bank LoRAs of each record's first `top_k` passages, summed.

    `passage_ids(record, top_k)` names the bank keys (default: "<test_id>_<pid>"). A record
    without passages gets a zero LoRA of the bank's rank.
    """

    def __init__(self, bank: Any, top_k: int = 3, dtype: torch.dtype | None = None,
                 device: torch.device | None = None,
                 passage_ids: Callable[[dict[str, Any], int], list[str]] = record_passage_ids) -> None:
        self.bank, self.top_k, self.dtype, self.device = bank, top_k, dtype, device
        self.passage_ids = passage_ids
        self.scaling = bank.spec.scaling

    def missing(self, records: Iterable[dict[str, Any]]) -> list[str]:
        """Passage ids the records need that the bank does not hold."""
        have = set(self.bank.passage_ids)
        return [pid for record in records for pid in self.passage_ids(record, self.top_k) if pid not in have]

    def check(self, records: Iterable[dict[str, Any]]) -> None:
        """Open every bank shard the records need (checked against the index): a corrupt one fails before answering."""
        self.bank.check([pid for record in records for pid in self.passage_ids(record, self.top_k)])

    def __call__(self, records: Sequence[dict[str, Any]]) -> LoraWeights:
        from .lora import combine_sum, select

        ids = [self.passage_ids(record, self.top_k) for record in records]
        flat = [pid for group in ids for pid in group]
        if not flat:  # no passages anywhere in the batch: an all-zero LoRA per record
            return self._zeros(len(records))
        stacked = self.bank.load(flat, dtype=self.dtype, device=self.device)
        singles, start = [], 0
        for group in ids:
            if not group:
                singles.append(self._zeros(1, like=stacked))
                continue
            singles.append(combine_sum([select(stacked, i) for i in range(start, start + len(group))]))
            start += len(group)
        return stack_loras(singles)

    def _zeros(self, batch: int, like: LoraWeights | None = None) -> LoraWeights:
        like = like or self.bank.load(self.bank.passage_ids[:1], dtype=self.dtype, device=self.device)
        return {path: (a.new_zeros((batch, *a.shape[1:])), b.new_zeros((batch, *b.shape[1:])))
                for path, (a, b) in like.items()}


def generate_batched(model: Any, tokenizer: Any, prompt_ids: Sequence[list[int]], batch_size: int,
                     generate_kwargs: dict[str, Any], show_progress: bool = False,
                     before_batch: Callable[[list[int]], Any] | None = None) -> list[str]:
    """Generate continuations of token-id prompts in left-padded, length-sorted batches.

    Replies come back in the order of the prompts. `before_batch(indices)` (optional) returns
    a context manager entered around each batch's `generate` call, given the prompt indices of
    the batch: this is how per-sample LoRAs are injected.
    """
    from contextlib import nullcontext

    import torch
    from tqdm.auto import tqdm

    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    replies: list[str] = [""] * len(prompt_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=not show_progress, unit="batch"):
        batch = order[start:start + batch_size]
        width = max(len(prompt_ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = prompt_ids[index]
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        context = before_batch(batch) if before_batch is not None else nullcontext()
        with torch.no_grad(), context:
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    pad_token_id=pad, **generate_kwargs)
        for index, text in zip(batch, tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)):
            replies[index] = text
    return replies


def answer_questions(model: Any, tokenizer: Any, records: Sequence[dict[str, Any]], method: Method,
                     lora: LoraProvider | None = None, top_k: int = 3, with_cot: bool = False,
                     fewshot: str | None = None, batch_size: int = 8, max_new_tokens: int = 20,
                     show_progress: bool = False) -> list[dict[str, Any]]:
    """Answer every record with `method`; one prediction dict per record, scored.

    Each prediction: test_id, question, answer (gold aliases), method, generation (raw text),
    prediction (the extracted answer), em, f1, precision, recall, and the record's sub-type
    (`type`) where it has one.
    """
    if method.lora is not None and lora is None:
        raise ValueError(f"method {method.name} needs the {method.lora!r} LoRA provider")
    prompts = [get_prompt(tokenizer, r["question"], (r.get("passages") or [])[:top_k] if method.in_context else None,
                          with_cot=with_cot, fewshot=fewshot) for r in records]
    before_batch = None
    if method.lora is not None:
        from .lora import inject_lora

        def inject(indices: list[int]):
            return inject_lora(model, lora([records[i] for i in indices]), lora.scaling)

        before_batch = inject

    generations = generate_batched(model, tokenizer, prompts, batch_size,
                                   {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1},
                                   show_progress, before_batch)
    predictions = []
    for record, text in zip(records, generations):
        score = evaluate(text, record["answer"], with_cot)
        predictions.append({"test_id": record["test_id"], "question": record["question"], "answer": record["answer"],
                            "method": method.name, "generation": text, "prediction": score.prediction,
                            "em": score.em, "f1": score.f1, "precision": score.precision, "recall": score.recall,
                            **({"type": record["type"]} if record.get("type") is not None else {})})
    return predictions


def results_table(predictions: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method (in first-seen order): method, questions, and em, f1, precision, recall in percent
    (the unit of every stage's results file; each prediction's own scores are fractions)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for prediction in predictions:
        by_method.setdefault(prediction["method"], []).append(prediction)
    return [{"method": name, "questions": len(preds),
             **{key: 100 * sum(p[key] for p in preds) / len(preds) for key in SCORE_KEYS}}
            for name, preds in by_method.items()]


def results_by_type(predictions: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """`results_table` of each sub-type of the records (their `type`, first seen first); {} without sub-types."""
    from .benchmarks import TOTAL

    kinds = list(dict.fromkeys(p["type"] for p in predictions if p.get("type") not in (None, TOTAL)))
    return {kind: results_table(p for p in predictions if p.get("type") == kind) for kind in kinds}


def types_markdown(by_type: dict[str, list[dict[str, Any]]], rows: Sequence[dict[str, Any]]) -> str:
    """EM / F1 (%) per method and sub-type, with every question in the last column."""
    counts = {kind: kind_rows[0]["questions"] for kind, kind_rows in by_type.items()}
    head = [f"{kind} ({n})" for kind, n in counts.items()] + [f"all ({rows[0]['questions']})"]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for row in rows:
        cells = [next((r for r in by_type[kind] if r["method"] == row["method"]), None) for kind in by_type] + [row]
        lines.append(f"| {row['method']} | " + " | ".join(
            "-" if cell is None else f"{cell['em']:.2f} / {cell['f1']:.2f}" for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The results table as GitHub markdown (EM/F1 etc. in percent, two decimals)."""
    lines = ["| method | questions | EM | F1 | precision | recall |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['questions']} | " + " | ".join(
            f"{row[key]:.2f}" for key in SCORE_KEYS) + " |")
    return "\n".join(lines) + "\n"
