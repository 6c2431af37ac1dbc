"""PRAG encoding: one LoRA per passage, many passages trained at once in one batched forward/backward.

The original (PRAG `src/encode.py`) trains each passage's LoRA alone: load the shared initial
adapter with `peft`, run `AdamW(lr=3e-4)` over the passage's training texts with batch size 1
for one epoch (loss on every token of a text), save, unload, next passage. Here P passages
train together: their A/B are stacked leaf tensors ([P, r, in] / [P, out, r]) injected per
sample with `inject_lora`, and each row of the batch carries one text of one passage. The
loss is the sum over passages of each passage's own mean token loss, so passage p's gradient
is exactly the gradient of its own loss (nothing couples across passages), and AdamW, being
elementwise, is run on the stacked tensors with the update rule of `torch.optim.AdamW`. The
result equals training the passages one at a time with `peft` (tests/test_encode.py).

Training texts per passage (PRAG's `get_train_data`, direct answers): with n QA pairs, each of
the first ceil(n/2) pairs gives two texts, the QA prompt with the passage in context and with
the rewrite in context; each remaining pair gives the QA prompt without passages. A text is
the chat-rendered prompt plus "The answer is <answer>." and the loss covers all its tokens.
A passage without augmentation trains on its own text (and its rewrite when there is one).

A passage whose loss becomes NaN/inf stops training there (no more rows, no more updates) and
is reported in `EncodedBatch.finite`; its rows take no part in the backward pass, so the other
passages of the batch train exactly as they would without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .lora import LoraSpec, LoraWeights, inject_lora, module_shapes, target_module_names

Text = list[int]  # token ids of one training text


@dataclass(frozen=True)
class EncodeConfig:
    """The per-passage training recipe; defaults are the original's (PRAG configs, torch AdamW defaults)."""

    learning_rate: float = 3e-4
    num_epochs: int = 1
    texts_per_step: int = 1  # the original's per_device_train_batch_size
    weight_decay: float = 0.01  # torch.optim.AdamW's default (the original passes lr only)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_length: int = 3000  # texts are cut to this many tokens, as the original's TrainingData
    max_batch_tokens: int = 16384  # padded tokens per forward; more rows run as gradient accumulation


def default_max_batch_tokens(device: torch.device | str) -> int:
    """Padded tokens per forward when none is given: 16384 on an accelerator; 4096 on a CPU, where
    smaller forwards stay in cache (~1.6x faster on the real PRAG records)."""
    return 4096 if torch.device(device).type == "cpu" else 16384


def init_lora(model: nn.Module, spec: LoraSpec, seed: int = 42) -> LoraWeights:
    """The shared initial LoRA (batch 1, fp32): peft's default init from one seeded generator.

    A ~ kaiming_uniform(a=sqrt(5)) (what nn.Linear and peft use), B = 0, so every passage
    starts from the same adapter and the initial delta is zero.
    """
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (in_features, out_features) in module_shapes(model, target_module_names(model, spec)).items():
        lora_a = torch.empty(1, spec.rank, in_features)
        nn.init.kaiming_uniform_(lora_a[0], a=math.sqrt(5), generator=generator)
        weights[name] = (lora_a, torch.zeros(1, out_features, spec.rank))
    return weights


def passage_texts(tokenizer: Any, passage: str, rewrite: str | None = None,
                  qas: Sequence[dict[str, str]] | None = None, with_cot: bool = False,
                  fewshot: str | None = None, max_length: int = 3000) -> list[Text]:
    """PRAG's training texts of one passage (see the module docstring), as token ids.

    `with_cot` trains on each QA's `full_answer` with the chain-of-thought prompt (needs the
    few-shot block), as the original's --with_cot.
    """
    from .prompts import get_prompt

    texts: list[Text] = []
    qas = [qa for qa in (qas or []) if qa.get("question") and qa.get("full_answer" if with_cot else "answer")]
    with_passage = (len(qas) + 1) // 2
    for index, qa in enumerate(qas):
        answer = qa["full_answer"] if with_cot else qa["answer"]
        if index < with_passage:  # in context: the passage, then its rewrite
            contexts = [[passage], [rewrite]] if rewrite else [[passage]]
        else:
            contexts = [None]
        for context in contexts:
            texts.append(get_prompt(tokenizer, qa["question"], context, answer, with_cot=with_cot, fewshot=fewshot))
    if not texts:  # no QA pairs: language modelling on the passage (and its rewrite)
        texts = [tokenizer.encode(text) for text in (passage, rewrite) if text]
    return [text[:max_length] for text in texts]


class BatchedAdamW:
    """`torch.optim.AdamW` run independently per passage on stacked [P, ...] tensors.

    AdamW is elementwise, so updating rows `active` of the stacked tensors with the same
    formula and the same step count is exactly P separate optimizers. Rows not in `active`
    (passages whose texts are used up) keep their parameters and moments.
    """

    def __init__(self, params: list[torch.Tensor], config: EncodeConfig) -> None:
        self.params, self.config = params, config
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, step: int, active: torch.Tensor | None = None) -> None:
        """Apply update number `step` (1-based) to the rows `active` (all rows when None)."""
        lr, (beta1, beta2), eps, decay = (self.config.learning_rate, self.config.betas, self.config.eps,
                                          self.config.weight_decay)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        step_size = lr / bias_correction1
        for param, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            rows = (param, exp_avg, exp_avg_sq, grad) if active is None else (
                param[active], exp_avg[active], exp_avg_sq[active], grad[active])
            p, m, v, g = rows
            # The same operations in the same order as torch's single-tensor AdamW.
            p.mul_(1 - lr * decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(m, denom, value=-step_size)
            if active is not None:  # fancy indexing copied the rows: write them back
                param[active], exp_avg[active], exp_avg_sq[active] = p, m, v
            param.grad = None


@dataclass
class EncodedBatch:
    weights: LoraWeights  # [P, r, in] / [P, out, r], fp32, detached
    epoch_loss: torch.Tensor  # [P, num_epochs]: each passage's mean text loss per epoch (NaN where not finite)
    finite: torch.Tensor  # [P] bool: the loss stayed finite; the other rows of `weights` must not be used


def _row_losses(model: nn.Module, rows: list[Text], pad_token_id: int, device: torch.device) -> torch.Tensor:
    """Sum of next-token losses of each row.

    Rows are right-padded and run without an attention mask: under causal attention a real
    token never sees the pads after it, so its output is the unpadded one, and the pads'
    own outputs are excluded from the loss. This keeps SDPA on its fast causal path.
    """
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), length), -100, dtype=torch.long)  # position t predicts token t + 1
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        targets[i, :len(row) - 1] = input_ids[i, 1:len(row)]
    logits = model(input_ids=input_ids.to(device), use_cache=False).logits
    losses = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.to(device).reshape(-1),
                                         reduction="none", ignore_index=-100)
    return losses.view(len(rows), -1).sum(dim=1)


def encode_batch(model: nn.Module, spec: LoraSpec, init: LoraWeights, texts: Sequence[Sequence[Text]],
                 config: EncodeConfig, pad_token_id: int) -> EncodedBatch:
    """Train one LoRA per passage (`texts[p]` = passage p's training texts) from `init`, all at once.

    Step s of passage p uses its minibatch s mod ceil(n_p / texts_per_step) (no shuffling, as
    the original's DataLoader); a passage stops after num_epochs passes over its texts. Each
    passage's loss is the mean over the tokens of its own minibatch (HF's causal LM loss), and
    the batch loss is their sum. `model` is frozen and may be in bf16; A/B train in fp32. A
    passage whose loss turns NaN/inf stops there and is marked in `finite` (module docstring).
    """
    if any(len(t) == 0 for t in texts):
        raise ValueError("every passage needs at least one training text")
    device = next(model.parameters()).device
    count = len(texts)
    leaves = {name: (a.detach().float().expand(count, -1, -1).clone().to(device).requires_grad_(),
                     b.detach().float().expand(count, -1, -1).clone().to(device).requires_grad_())
              for name, (a, b) in init.items()}
    optimizer = BatchedAdamW([t for pair in leaves.values() for t in pair], config)
    size = config.texts_per_step
    minibatches = [[list(t[i:i + size]) for i in range(0, len(t), size)] for t in texts]
    steps = [config.num_epochs * len(mb) for mb in minibatches]
    loss_sums = torch.zeros(count, config.num_epochs, dtype=torch.float64)
    finite = torch.ones(count, dtype=torch.bool)
    for step in range(max(steps)):
        active = [p for p in range(count) if step < steps[p] and finite[p]]
        if not active:  # every passage left has diverged
            break
        # Rows of this step: every text of each active passage's current minibatch.
        rows, owners = [], []
        for p in active:
            for text in minibatches[p][step % len(minibatches[p])]:
                rows.append(text)
                owners.append(p)
        tokens = torch.zeros(count)  # predicted tokens per passage: its loss is a mean over them
        for row, p in zip(rows, owners):
            tokens[p] += len(row) - 1
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a forward
        for chunk in _chunks(order, [len(rows[i]) for i in order], config.max_batch_tokens):
            owner = torch.tensor([owners[i] for i in chunk], device=device)
            weights = {name: (a.index_select(0, owner), b.index_select(0, owner)) for name, (a, b) in leaves.items()}
            with inject_lora(model, weights, spec.scaling):
                row_loss = _row_losses(model, [rows[i] for i in chunk], pad_token_id, device)
            per_row = row_loss / tokens.to(device).index_select(0, owner).clamp(min=1)
            values, owned = per_row.detach().double().cpu(), owner.cpu()
            finite[owned[~values.isfinite()]] = False
            kept = finite[owned]  # every row of a diverged passage leaves the loss, this chunk's included
            if kept.any():
                per_row[kept.to(device)].sum().backward()
            for value, p in zip(values[kept].tolist(), owned[kept].tolist()):
                loss_sums[p, step // len(minibatches[p])] += value
        active = [p for p in active if finite[p]]
        if active:
            optimizer.step(step + 1, None if len(active) == count else torch.tensor(active, device=device))
    epoch_loss = loss_sums / torch.tensor([len(mb) for mb in minibatches], dtype=torch.float64)[:, None]
    epoch_loss[~finite] = float("nan")
    weights = {name: (a.detach(), b.detach()) for name, (a, b) in leaves.items()}
    return EncodedBatch(weights, epoch_loss.float(), finite)


def _chunks(items: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Consecutive groups whose padded size (rows x longest) stays within max_tokens (at least one row)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for item, length in zip(items, lengths):
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            chunks.append(current)
            current, longest = [], 0
        current.append(item)
        longest = max(longest, length)
    if current:
        chunks.append(current)
    return chunks


def plan_batches(sizes: Sequence[int], batch_size: int) -> list[list[int]]:
    """Passage indices grouped `batch_size` at a time, sorted by training size so a batch pads little."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
