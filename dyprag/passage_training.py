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

Memory. A step's rows run as several forwards of at most `max_batch_tokens` padded tokens each
(gradient accumulation: each passage's gradient is the sum over the forwards holding its rows,
the same sum as one forward), and the loss never holds the [tokens, vocabulary] logits: the
decoder's hidden states at the labelled positions go through the LM head and the cross-entropy a
few hundred tokens at a time, each chunk's gradient with respect to its hidden states computed
right there (`linear_cross_entropy`). What a forward keeps for the backward is then the
decoder's activations, ~1.4 MB per token for a 30-layer, 576-wide model in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .lora import LoraSpec, LoraWeights, inject_lora, module_shapes, target_module_names
from .padding import IGNORE_INDEX

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


LOGITS_PER_CHUNK = 1 << 23  # logits [tokens, vocabulary] held at once by linear_cross_entropy (32 MiB in fp32)


def default_max_batch_tokens(device: torch.device | str) -> int:
    """Padded tokens per forward when none is given: 16384 on an accelerator; 512 on a CPU, where
    a forward's saved activations are most of what a rank holds (~0.7 GB for SmolLM2-135M in fp32:
    a rank's peak is ~2.2 GB, against ~3.2 GB with 1024 tokens, at ~10 % fewer passages/s;
    bench/encode_memory.py)."""
    return 512 if torch.device(device).type == "cpu" else 16384


def training_tokens(texts: Sequence[Sequence[Text]], config: EncodeConfig) -> int:
    """Predicted tokens `encode_batch` trains on for these passages (each text once per epoch)."""
    return config.num_epochs * sum(len(text) - 1 for passage in texts for text in passage)


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


@dataclass(frozen=True)
class StepReport:
    """What `encode_batch` tells its `on_step` callback after each optimizer step."""

    step: int  # 1-based
    steps: int  # steps of the batch: its longest passage's (the batch ends sooner if every passage diverged)
    finished: int  # passages of the batch done: all their steps run, or diverged
    tokens: int  # predicted tokens trained on in this step (sums to `training_tokens` over a finite batch)


@dataclass
class EncodedBatch:
    weights: LoraWeights  # [P, r, in] / [P, out, r], fp32, detached
    epoch_loss: torch.Tensor  # [P, num_epochs]: each passage's mean text loss per epoch (NaN where not finite)
    finite: torch.Tensor  # [P] bool: the loss stayed finite; the other rows of `weights` must not be used


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `head(hidden)`, never holding more than a chunk of the logits.

    The forward runs the head and the loss over chunks of tokens and keeps, per token, the
    gradient of its loss with respect to its hidden state, (softmax - onehot) pushed back through
    the head (autograd of the head alone: any module works, its weights stay frozen). The backward
    scales that by the incoming per-token gradient: no recompute, and a [tokens, hidden] tensor
    where the plain loss keeps [tokens, vocabulary] logits, their log-softmax and its gradient.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,  # type: ignore[override]
                chunk: int) -> torch.Tensor:
        losses = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        with torch.enable_grad():
            for start in range(0, len(targets), chunk):
                part = hidden[start:start + chunk].detach().requires_grad_()
                out = head(part)
                logits = out.detach().float()  # the loss in fp32, as HF's (its linear backward never reads `out`)
                target = targets[start:start + chunk]
                norm = logits.logsumexp(dim=-1)
                losses[start:start + chunk] = norm - logits.gather(1, target[:, None]).squeeze(1)
                probs = logits.sub_(norm[:, None]).exp_()  # softmax, in place
                probs.scatter_add_(1, target[:, None], probs.new_full((len(target), 1), -1.0))
                grad[start:start + chunk] = torch.autograd.grad(out, part, probs.to(out.dtype))[0]
        ctx.save_for_backward(grad)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_losses[:, None].to(grad.dtype), None, None, None


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                         vocab_size: int) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` per token ([N, H] hidden, [N] targets -> [N] fp32), the
    logits made and dropped a chunk at a time (`LOGITS_PER_CHUNK`); the gradient flows to `hidden`."""
    return _LinearCrossEntropy.apply(hidden, head, targets, max(1, LOGITS_PER_CHUNK // vocab_size))


def loss_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, LM head) when `model`'s logits are exactly `head(decoder(ids).last_hidden_state)`, else None.

    Checked on a 4-token probe rather than assumed: a model that post-processes its logits (soft-capping,
    a logit scale) fails it, and its loss is then taken from its own logits.
    """
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    decoder, head = (get_decoder(), get_head()) if callable(get_decoder) and callable(get_head) else (None, None)
    if decoder is None or decoder is model or head is None or not hasattr(head, "out_features"):
        return None
    probe = torch.arange(4, device=next(model.parameters()).device)[None] % head.out_features
    with torch.no_grad():
        expected = model(input_ids=probe, use_cache=False).logits.float()
        got = head(decoder(input_ids=probe, use_cache=False).last_hidden_state).float()
    return (decoder, head) if got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-4,
                                                                              atol=1e-5) else None


def _row_losses(model: nn.Module, head: tuple[nn.Module, nn.Module] | None, rows: list[Text], pad_token_id: int,
                device: torch.device) -> torch.Tensor:
    """Sum of next-token losses of each row (fp32).

    Rows are right-padded and run without an attention mask: under causal attention a real
    token never sees the pads after it, so its output is the unpadded one, and the pads'
    own outputs are excluded from the loss. This keeps SDPA on its fast causal path. With a
    `head` (`loss_head`) only the labelled positions reach the LM head, through
    `linear_cross_entropy`; without one, the model's own full logits give the loss.
    """
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # position t predicts token t + 1
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        targets[i, :len(row) - 1] = input_ids[i, 1:len(row)]
    input_ids, targets = input_ids.to(device), targets.to(device)
    if head is None:
        logits = model(input_ids=input_ids, use_cache=False).logits
        losses = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             reduction="none", ignore_index=IGNORE_INDEX).view(len(rows), -1)
    else:
        decoder, lm_head = head
        hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        labelled = targets != IGNORE_INDEX
        losses = torch.zeros(targets.shape, dtype=torch.float32, device=device)  # zero at pads, as ignore_index
        losses[labelled] = linear_cross_entropy(hidden[labelled], lm_head, targets[labelled], lm_head.out_features)
    return losses.sum(dim=1)


def encode_batch(model: nn.Module, spec: LoraSpec, init: LoraWeights, texts: Sequence[Sequence[Text]],
                 config: EncodeConfig, pad_token_id: int,
                 on_step: Callable[[StepReport], None] | None = None) -> EncodedBatch:
    """Train one LoRA per passage (`texts[p]` = passage p's training texts) from `init`, all at once.

    Step s of passage p uses its minibatch s mod ceil(n_p / texts_per_step) (no shuffling, as
    the original's DataLoader); a passage stops after num_epochs passes over its texts. Each
    passage's loss is the mean over the tokens of its own minibatch (HF's causal LM loss), and
    the batch loss is their sum. `model` is frozen and may be in bf16; A/B train in fp32. A
    passage whose loss turns NaN/inf stops there and is marked in `finite` (module docstring).
    `on_step` is called after every optimizer step (progress).
    """
    if any(len(t) == 0 for t in texts):
        raise ValueError("every passage needs at least one training text")
    device = next(model.parameters()).device
    head = loss_head(model)
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
                row_loss = _row_losses(model, head, [rows[i] for i in chunk], pad_token_id, device)
            per_row = row_loss / tokens.to(device).index_select(0, owner).clamp(min=1)
            values, owned = per_row.detach().double().cpu(), owner.cpu()
            finite[owned[~values.isfinite()]] = False
            kept = finite[owned]  # every row of a diverged passage leaves the loss, this chunk's included
            if kept.any():
                per_row[kept.to(device)].sum().backward()
            for value, p in zip(values[kept].tolist(), owned[kept].tolist()):
                loss_sums[p, step // len(minibatches[p])] += value
        trained = int(tokens[finite].sum())  # the rows of passages that diverged in this step are left out
        active = [p for p in active if finite[p]]
        if active:
            optimizer.step(step + 1, None if len(active) == count else torch.tensor(active, device=device))
        if on_step is not None:
            finished = sum(1 for p in range(count) if steps[p] <= step + 1 or not finite[p])
            on_step(StepReport(step + 1, max(steps), finished, trained))
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
