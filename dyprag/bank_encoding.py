"""PRAG's offline step as one loop: the passages of a record set trained batch by batch into a LoRA bank.

Passages that several records hold with the same text and augmentation train once (`shared_rows`: their ids
share one bank row). `passages_per_batch` passages train together (`passage_training.encode_batch`) and each
finished batch goes straight to the bank's writer, so a killed run keeps its finished shards and a resumed run
skips the passages already in the bank (`encoded_ids`), training on from the bank's saved initialisation
(`initial_lora`). A passage whose loss becomes NaN/inf stops the run (`NonFiniteLoss`, raised once the earlier
batches are written) or, with `skip_nonfinite`, is left out of the bank; the other passages of its batch train
exactly as they would without it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .bank import INDEX_FILE, LoraBankError, LoraBankWriter, check_shards, part_indexes
from .lora import LoraSpec, LoraWeights
from .records import Passage

logger = logging.getLogger(__name__)

INIT_DIR = "init"  # under the bank: the LoRA every passage starts from (a peft adapter)


class NonFiniteLoss(Exception):
    """The loss of some passages became NaN/inf (`skip_nonfinite` off); the earlier batches are in the bank."""

    def __init__(self, passage_ids: list[str], batch: int) -> None:
        super().__init__(f"the training loss of passage(s) {', '.join(passage_ids)} became NaN/inf (batch {batch})")
        self.passage_ids, self.batch = passage_ids, batch


@dataclass
class BankEncoding:
    """What one rank's `encode_into_bank` did: the passage ids left out (NaN/inf, copies included) and the
    predicted tokens it trained on."""

    skipped: list[str]
    tokens: int


def encoded_ids(out: Path) -> set[str]:
    """Passage ids already in the bank at `out`: its index and the part indexes of an unfinished run, every
    shard checked first (`LoraBankError` names a truncated one, which a continued bank would otherwise keep)."""
    check_shards(out)
    ids: set[str] = set()
    for index_file in [out / INDEX_FILE, *part_indexes(out)]:
        if index_file.is_file():
            ids |= set(json.loads(index_file.read_text(encoding="utf-8"))["passages"])
    return ids


def shared_rows(passages: Sequence[Passage], done: set[str]) -> dict[str, list[str]]:
    """One LoRA per distinct (text, rewrite, QA pairs) not in `done`: its first passage id -> the other ids."""
    copies: dict[tuple[str, str | None, str], list[str]] = {}
    for passage in passages:
        if passage.id not in done:
            key = (passage.text, passage.rewrite, json.dumps(passage.qas, sort_keys=True))
            copies.setdefault(key, []).append(passage.id)
    return {ids[0]: ids[1:] for ids in copies.values()}


def initial_lora(model: Any, spec: LoraSpec, out: Path, *, resume: bool, seed: int, base_model: str | None,
                 write: bool) -> LoraWeights:
    """The bank's shared initialisation: the saved one when resuming a bank that has it (the same rank and
    alpha, else `LoraBankError`), else a new one from `seed` (the same on every rank), saved when `write`."""
    from .lora import read_peft_adapter, save_peft_adapter
    from .passage_training import init_lora

    folder = out / INIT_DIR
    if resume and folder.is_dir():  # train on from exactly the saved initialisation
        init, saved = read_peft_adapter(folder)
        if (saved.rank, saved.alpha) != (spec.rank, spec.alpha):
            raise LoraBankError(f"{folder} holds a rank-{saved.rank} LoRA; encode with the bank's settings or a new "
                             f"--output_dir.")
        return init
    init = init_lora(model, spec, seed)
    if write:
        save_peft_adapter(init, 0, spec, base_model, folder)
    return init


def training_texts(tokenizer: Any, passages: Sequence[Passage], cutoff_len: int, with_cot: bool = False,
                   fewshot: str | None = None) -> list[list[list[int]]]:
    """Each passage's training texts (`passage_training.passage_texts`), each cut to its first `cutoff_len`
    tokens; how many were longer is logged."""
    from .passage_training import passage_texts

    texts = [passage_texts(tokenizer, p.text, p.rewrite, p.qas, with_cot, fewshot, max_length=sys.maxsize)
             for p in passages]
    too_long = sum(len(text) > cutoff_len for row in texts for text in row)
    if too_long:
        logger.warning("%d of %d training texts are longer than --cutoff_len %d tokens: each keeps its first %d.",
                       too_long, sum(map(len, texts)), cutoff_len, cutoff_len)
    return [[text[:cutoff_len] for text in row] for row in texts]


def encode_into_bank(model: Any, spec: LoraSpec, init: LoraWeights, passages: Sequence[Passage],
                     texts: Sequence[Sequence[list[int]]], aliases: dict[str, list[str]], recipe: Any,
                     writer: LoraBankWriter, pad_token_id: int, *, passages_per_batch: int,
                     skip_nonfinite: bool = False, log: Callable[[dict[str, Any]], None] | None = None,
                     show_progress: bool = False) -> BankEncoding:
    """Train `passages` (with their `texts`) batch by batch into `writer`, each under its own id and its
    `aliases`. `log` gets one record per batch (step, passages, loss, first_epoch_loss, skipped_passages,
    passages_per_second).

    The progress bar counts training tokens, so it moves at every optimizer step and its ETA holds across
    batches of unequal passages; its postfix names the passages done and the step within the batch.
    """
    from tqdm.auto import tqdm

    # Looked up at call time: tests replace passage_training.encode_batch to make a passage diverge.
    from . import passage_training

    batches = passage_training.plan_batches([sum(map(len, t)) for t in texts], passages_per_batch)
    skipped: list[str] = []
    encoded, trained, start = 0, 0, time.time()  # passages of the finished batches; predicted tokens trained on
    with tqdm(total=passage_training.training_tokens(texts, recipe), desc="encode", unit="tok", unit_scale=True,
              disable=not show_progress) as progress:
        for number, batch in enumerate(batches, start=1):
            batch_texts = [texts[i] for i in batch]

            def on_step(report: passage_training.StepReport, number: int = number, encoded: int = encoded) -> None:
                nonlocal trained
                trained += report.tokens
                progress.set_postfix_str(f"passages {encoded + report.finished}/{len(passages)}, batch {number}/"
                                         f"{len(batches)} step {report.step}/{report.steps}", refresh=False)
                progress.update(report.tokens)

            before = trained
            result = passage_training.encode_batch(model, spec, init, batch_texts, recipe, pad_token_id, on_step)
            progress.update(passage_training.training_tokens(batch_texts, recipe) - (trained - before))  # diverged
            encoded += len(batch)
            failed = [passages[i].id for i, finite in zip(batch, result.finite.tolist()) if not finite]
            if failed and not skip_nonfinite:
                writer.flush()  # the passages of the earlier batches go into the bank: a resumed run keeps them
                progress.close()  # the bar's last line before the message
                raise NonFiniteLoss(failed, number)
            for row, i in enumerate(batch):
                if result.finite[row]:
                    writer.add(passages[i].id, result.weights, row, aliases=aliases[passages[i].id])
            if failed:
                skipped += [pid for failure in failed for pid in (failure, *aliases[failure])]
                logger.warning("non-finite training loss of passage(s) %s: left out of the bank (%d so far; a "
                               "resumed run tries them again)", ", ".join(failed), len(skipped))
            if log is not None:
                losses = result.epoch_loss[result.finite]  # the skipped passages' losses are NaN
                log({"step": number, "passages": encoded,
                     **({"loss": losses[:, -1].mean().item(), "first_epoch_loss": losses[:, 0].mean().item()}
                        if len(losses) else {}),
                     **({"skipped_passages": len(skipped)} if skipped else {}),
                     "passages_per_second": encoded / (time.time() - start)})
    return BankEncoding(skipped, trained)
