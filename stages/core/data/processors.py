"""Per-stage preprocessing: aligned rows -> token ids, run with `datasets.map(batched=True)`.

Each function takes a batch of aligned rows (`_prompt`, `_response`, `_system`) and returns
model inputs. Rows that end up with nothing to learn are dropped inside the batch; the
caller counts them from the lengths before and after. The `_truncated` column (sft, rm and
generation prompts) says how many samples of each row were cut to `cutoff_len`; the caller
counts and removes it.

Truncation rule (sft, rm): turns are kept in order until `cutoff_len`; the turn that does
not fit is cut, prompt and response in proportion to their lengths, response kept to at
least one token; later turns are dropped. Generation prompts (ppo, sft predict) keep their
last `cutoff_len` tokens. pt joins the texts and cuts `cutoff_len` blocks (the last partial
block of every 1000 rows is dropped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..arguments import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .template import Template

Batch = dict[str, list[Any]]
TRUNCATED = "_truncated"  # per model row: how many of its samples were cut to cutoff_len


def split_budget(source_len: int, target_len: int, budget: int) -> tuple[int, int]:
    """How many prompt and response tokens of one turn fit into `budget` tokens."""
    if source_len + target_len <= budget:
        return source_len, target_len
    target_keep = min(target_len, max(1, budget * target_len // max(source_len + target_len, 1)))
    source_keep = min(source_len, budget - target_keep)
    return source_keep, target_keep


def pt_blocks(batch: Batch, tokenizer: PreTrainedTokenizerBase, cutoff_len: int) -> Batch:
    """pt: texts + eos concatenated, then cut into blocks of `cutoff_len` (the remainder is dropped)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for prompt in batch["_prompt"]:
        text = prompt[0]["content"] if prompt else ""
        if text:
            stream += tokenizer.encode(text, add_special_tokens=False) + eos
    usable = len(stream) // cutoff_len * cutoff_len
    blocks = [stream[i: i + cutoff_len] for i in range(0, usable, cutoff_len)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def encode_supervised(messages: list[dict[str, str]], system: str, tokenizer: PreTrainedTokenizerBase,
                      template: Template, cutoff_len: int, train_on_prompt: bool
                      ) -> tuple[list[int], list[int], bool]:
    """One conversation -> (input_ids, labels, truncated); labels hold every assistant turn, nothing else."""
    input_ids: list[int] = []
    labels: list[int] = []
    truncated = False
    for source, target in template.encode_multiturn(tokenizer, messages, system):
        budget = cutoff_len - len(input_ids)
        if budget <= 0:
            truncated = True
            break
        source_len, target_len = split_budget(len(source), len(target), budget)
        truncated |= source_len + target_len < len(source) + len(target)
        source, target = source[:source_len], target[:target_len]
        input_ids += source + target
        labels += (source if train_on_prompt else [IGNORE_INDEX] * len(source)) + target
    return input_ids, labels, truncated


def supervised(batch: Batch, tokenizer: PreTrainedTokenizerBase, template: Template, cutoff_len: int,
               train_on_prompt: bool) -> Batch:
    """sft: loss on every assistant turn; rows without a single supervised token are dropped."""
    out: Batch = {"input_ids": [], "labels": [], TRUNCATED: []}
    for prompt, response, system in zip(batch["_prompt"], batch["_response"], batch["_system"]):
        if len(response) != 1 or not prompt:
            continue
        input_ids, labels, truncated = encode_supervised(prompt + response, system, tokenizer, template, cutoff_len,
                                                         train_on_prompt)
        if any(label != IGNORE_INDEX for label in labels):
            out["input_ids"].append(input_ids)
            out["labels"].append(labels)
            out[TRUNCATED].append(int(truncated))
    return out


def pack_sequences(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: group sample indices into bins whose lengths sum to <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(capacity - lengths[index])
    return bins


def packed_supervised(batch: Batch, tokenizer: PreTrainedTokenizerBase, template: Template, cutoff_len: int,
                      train_on_prompt: bool) -> Batch:
    """sft with packing: several samples per row, each with its own positions and segment id.

    The collator turns `segment_ids` into a block-diagonal causal mask, so a token never
    attends to another sample of the same row.
    """
    single = supervised(batch, tokenizer, template, cutoff_len, train_on_prompt)
    out: Batch = {"input_ids": [], "labels": [], "position_ids": [], "segment_ids": [], TRUNCATED: []}
    for group in pack_sequences([len(ids) for ids in single["input_ids"]], cutoff_len):
        out[TRUNCATED].append(sum(single[TRUNCATED][index] for index in group))
        row: Batch = {key: [] for key in out if key != TRUNCATED}
        for segment, index in enumerate(group, start=1):
            ids = single["input_ids"][index]
            row["input_ids"] += ids
            # A sample's first token is never its own target; labelled (train_on_prompt), the
            # shifted loss would train the previous sample's last token to predict it.
            row["labels"] += [IGNORE_INDEX] + single["labels"][index][1:]
            row["position_ids"] += list(range(len(ids)))
            row["segment_ids"] += [segment] * len(ids)
        for key in row:
            out[key].append(row[key])
    return out


def prompt_only(batch: Batch, tokenizer: PreTrainedTokenizerBase, template: Template, cutoff_len: int) -> Batch:
    """Generation inputs: the prompt with its generation cue; `labels` = the reference answer ids."""
    out: Batch = {"input_ids": [], "labels": [], TRUNCATED: []}
    for prompt, response, system in zip(batch["_prompt"], batch["_response"], batch["_system"]):
        if not prompt:
            continue
        pairs = template.encode_multiturn(tokenizer, prompt, system)
        input_ids = [t for source, target in pairs for t in source + target]
        reference = template.encode_multiturn(tokenizer, prompt + response[:1], system)[-1][1] if response else []
        out["input_ids"].append(input_ids[-cutoff_len:])  # keep the end: it holds the question
        out["labels"].append(reference[:cutoff_len])
        out[TRUNCATED].append(int(max(len(input_ids), len(reference)) > cutoff_len))
    return out


def pairwise(batch: Batch, tokenizer: PreTrainedTokenizerBase, template: Template, cutoff_len: int) -> Batch:
    """rm: chosen and rejected conversations sharing one prompt."""
    out: Batch = {"chosen_input_ids": [], "chosen_labels": [], "rejected_input_ids": [], "rejected_labels": [],
                  TRUNCATED: []}
    for prompt, response, system in zip(batch["_prompt"], batch["_response"], batch["_system"]):
        if len(response) != 2 or not prompt:
            continue
        encoded = [encode_supervised(prompt + [answer], system, tokenizer, template, cutoff_len, False)
                   for answer in response]
        if all(any(label != IGNORE_INDEX for label in labels) for _, labels, _ in encoded):
            for key, (ids, labels, _) in zip(("chosen", "rejected"), encoded):
                out[f"{key}_input_ids"].append(ids)
                out[f"{key}_labels"].append(labels)
            out[TRUNCATED].append(int(any(truncated for _, _, truncated in encoded)))
    return out

