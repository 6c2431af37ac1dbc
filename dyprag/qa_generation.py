"""Passage augmentation (PRAG's data step): one rewrite and n QA pairs per passage, by an LLM.

Every passage gets the original's rewrite prompt and QA prompt (`dyprag.prompts`). The QA
reply must hold a JSON list of at least n {question, answer, full_answer} objects; replies
that do not parse are asked again, at most `max_attempts` times in all (the original asked
up to 100 times, one passage at a time). A passage whose QA never parses, or whose rewrite
stays empty, is skipped: it gets no LoRA and leaves the record's `passages`, and the
skips are counted in `AugmentStats`.

Generation goes through a `GenerateFn` (list of user messages -> list of replies), so the
retry logic is independent of the model; `HFGenerator` is the batched implementation for any
HF causal LM (chat template, left padding, length-sorted batches).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .inference import generate_batched
from .prompts import QA_PROMPT, REWRITE_PROMPT, chat_prefix
from .records import QA_SUFFIX, REWRITE_SUFFIX

logger = logging.getLogger(__name__)

GenerateFn = Callable[[list[str]], list[str]]
QA_KEYS = ("question", "answer", "full_answer")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def qa_prompt(passage: str, num_qa: int = 3) -> str:
    """The original QA prompt; asking for another count than three only swaps that word."""
    text = QA_PROMPT.format(passage=passage)
    if num_qa != 3:
        word = _NUMBER_WORDS[num_qa] if num_qa < len(_NUMBER_WORDS) else str(num_qa)
        text = text.replace("generate three different", f"generate {word} different").replace(
            "at least three elements", f"at least {word} elements")
    return text


def _json_candidates(text: str) -> list[str]:
    """Texts to try json.loads on: from the first "[", then the repairs small models need.

    Repairs (each tried in turn): cut after the first complete list (chatter after it), close a
    list left open (the original's fix for Llama-3.2-1B: drop a trailing comma, append "]"),
    and insert the comma the prompt's own example omits between two fields on separate lines.
    """
    start = text.find("[")
    if start == -1:
        return []
    body = text[start:].strip()
    candidates = [body]
    if "]" in body:
        candidates.append(body[: body.rfind("]") + 1])
    opened = body.rstrip().rstrip(",")
    if not opened.endswith("]"):
        candidates.append(opened + "]")
    candidates += [re.sub(r'"\s*\n(\s*)"', r'",\n\1"', c) for c in list(candidates)]
    return candidates


def parse_qa(text: str, num_qa: int = 3) -> list[dict[str, str]] | None:
    """The first `num_qa` QA pairs of a reply, or None when it holds no usable list.

    As the original's `fix_qa`: every pair needs question, answer and full_answer; a list
    answer is joined with ", ", a number becomes a string, null becomes "Unknown".
    """
    decoder = json.JSONDecoder()
    for candidate in _json_candidates(text):
        try:
            value, _ = decoder.raw_decode(candidate)  # ignores text after the list
        except json.JSONDecodeError:
            continue
        if not isinstance(value, list) or len(value) < num_qa:
            continue
        pairs = []
        for item in value[:num_qa]:
            if not isinstance(item, dict) or any(key not in item for key in QA_KEYS):
                break
            pair = {}
            for key in QA_KEYS:
                val = item[key]
                if isinstance(val, list):
                    val = ", ".join(str(v) for v in val)
                pair[key] = "Unknown" if val is None else str(val).strip()
            if not pair["question"]:
                break
            pairs.append(pair)
        if len(pairs) == num_qa:
            return pairs
    return None


@dataclass
class AugmentStats:
    """What happened to the passages of one augmentation run."""

    passages: int = 0
    augmented: int = 0
    skipped_qa: int = 0  # the QA reply never parsed within max_attempts
    skipped_rewrite: int = 0  # the rewrite stayed empty within max_attempts
    qa_requests: int = 0  # QA prompts sent, retries included
    skipped_ids: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return self.skipped_qa + self.skipped_rewrite

    def merge(self, other: AugmentStats) -> None:
        for key in ("passages", "augmented", "skipped_qa", "skipped_rewrite", "qa_requests"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        self.skipped_ids += other.skipped_ids

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "skipped": self.skipped}


@dataclass(frozen=True)
class Augmentation:
    rewrite: str
    qa: list[dict[str, str]]


def _retry(prompts: list[str], generate: GenerateFn, accept: Callable[[str], Any], max_attempts: int
           ) -> tuple[list[Any], int]:
    """Ask `prompts`, re-asking those whose reply `accept` maps to None; returns results + requests."""
    results: list[Any] = [None] * len(prompts)
    pending = list(range(len(prompts)))
    requests = 0
    for _ in range(max_attempts):
        if not pending:
            break
        replies = generate([prompts[i] for i in pending])
        requests += len(pending)
        for index, reply in zip(pending, replies):
            results[index] = accept(reply)
        pending = [i for i in pending if results[i] is None]
    return results, requests


def augment_passages(passages: Sequence[str], generate: GenerateFn, num_qa: int = 3, max_attempts: int = 5,
                     ids: Sequence[str] | None = None) -> tuple[list[Augmentation | None], AugmentStats]:
    """Rewrite + QA for each passage; None where the passage is skipped (see the module doc)."""
    if max_attempts < 1 or num_qa < 1:
        raise ValueError("max_attempts and num_qa must be at least 1")
    ids = list(ids) if ids is not None else [str(i) for i in range(len(passages))]
    rewrites, _ = _retry([REWRITE_PROMPT.format(passage=p) for p in passages], generate,
                         lambda reply: reply.strip() or None, max_attempts)
    qas, requests = _retry([qa_prompt(p, num_qa) for p in passages], generate,
                           lambda reply: parse_qa(reply, num_qa), max_attempts)
    stats = AugmentStats(passages=len(passages), qa_requests=requests)
    out: list[Augmentation | None] = []
    for pid, rewrite, qa in zip(ids, rewrites, qas):
        if qa is None or rewrite is None:
            stats.skipped_qa += qa is None
            stats.skipped_rewrite += qa is not None and rewrite is None
            stats.skipped_ids.append(pid)
            out.append(None)
            continue
        stats.augmented += 1
        out.append(Augmentation(rewrite, qa))
    return out, stats


def distinct_passages(records: Sequence[dict[str, Any]], passages: Sequence[Sequence[str]]
                      ) -> tuple[list[str], list[str]]:
    """The distinct texts of `passages` (`passages[i]` = record i's), first seen first, and the bank key
    ("<test_id>_<position>") of each one's first occurrence. Records that share passages (retrieval
    returns the same ones for related questions) have each text augmented once."""
    first: dict[str, str] = {}
    for record, texts in zip(records, passages):
        for k, text in enumerate(texts):
            first.setdefault(text, f"{record['test_id']}_{k}")
    return list(first), list(first.values())


def refill(passages: Sequence[Sequence[str]], top_k: int,
           augment: Callable[[list[str]], list[Augmentation | None]]) -> tuple[list[list[str]], dict]:
    """Each record's candidate passages tried in order until `top_k` of them parsed (the original's refill).

    `passages[i]` are record i's candidates, best first. Rounds: every record short of `top_k`
    parsed passages asks for as many of its next candidates as it lacks; their distinct texts not
    augmented yet go to `augment` together (texts -> augmentations, None where skipped). Returns
    each record's candidates up to the last one tried (for `augment_records`, which keeps the
    parsed ones) and every tried text's augmentation.
    """
    results: dict[str, Augmentation | None] = {}
    tried = [0] * len(passages)
    while True:
        before = list(tried)
        for i, texts in enumerate(passages):
            kept = sum(results[text] is not None for text in texts[:tried[i]])
            tried[i] = min(len(texts), tried[i] + top_k - kept)
        if tried == before:  # every record has top_k parsed passages or no candidate left
            return [list(texts[:tried[i]]) for i, texts in enumerate(passages)], results
        asked = list(dict.fromkeys(t for i, texts in enumerate(passages) for t in texts[:tried[i]] if t not in results))
        if asked:  # (a record's next candidates may all be texts augmented for other records already)
            results.update(zip(asked, augment(asked)))


def augment_records(records: Sequence[dict[str, Any]], passages: Sequence[Sequence[str]],
                    augmentations: Mapping[str, Augmentation | None], model_name: str,
                    passage_ids: Sequence[Sequence[str]] | None = None,
                    keep_skipped: bool = False) -> list[dict[str, Any]]:
    """Records in the PRAG format: `passages` = the augmented ones, `augment` = their augmentations.

    `passages[i]` are the candidate passages of `records[i]` (given or retrieved), `passage_ids[i]`
    their corpus ids when known (kept aligned in the output's `passage_ids`; a stale field is
    dropped); `augmentations` maps each passage text to its augmentation (`augment_passages`), None
    where it was skipped. As the original, skipped passages are dropped and the kept ones renumbered
    (pid = position), so bank keys stay "<test_id>_<position in passages>". With `keep_skipped`
    they stay in `passages` without an `augment` entry instead (encoding then trains their LoRA
    on the passage text alone), so every question keeps all its passages.
    """
    out = []
    for index, record in enumerate(records):
        fresh = {key: value for key, value in record.items() if key != "passage_ids"}
        row = {**fresh, "passages": [], "augment": [], **({"passage_ids": []} if passage_ids else {})}
        for k, text in enumerate(passages[index]):
            result = augmentations[text]
            if result is None and not keep_skipped:
                continue
            if result is not None:
                row["augment"].append({"pid": len(row["passages"]), "passage": text,
                                       f"{model_name}{REWRITE_SUFFIX}": result.rewrite,
                                       f"{model_name}{QA_SUFFIX}": result.qa})
            row["passages"].append(text)
            if passage_ids:
                row["passage_ids"].append(passage_ids[index][k])
        out.append(row)
    return out


class HFGenerator:
    """Batched chat generation with an HF causal LM: user messages in, decoded replies out.

    Prompts are rendered with the tokenizer's chat template, sorted by length (less padding),
    left-padded (generation continues right after each prompt) and generated `batch_size` at a
    time; replies come back in the order of the prompts.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, show_progress: bool = False,
                 **generate_kwargs: Any) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.show_progress = show_progress
        self.generate_kwargs = generate_kwargs

    def __call__(self, prompts: list[str]) -> list[str]:
        ids = [self.tokenizer.encode(chat_prefix(self.tokenizer, p), add_special_tokens=False) for p in prompts]
        return generate_batched(self.model, self.tokenizer, ids, self.batch_size, self.generate_kwargs,
                                self.show_progress)

