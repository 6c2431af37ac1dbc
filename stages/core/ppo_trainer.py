"""TRL's PPO trainer (`trl.experimental.ppo`, trl < 1.13) with what the ppo stage needs on top.

Kept apart from stages/ppo.py because defining the subclass imports trl (seconds).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import trl.experimental.ppo.ppo_trainer as trl_ppo
from accelerate.utils import gather_object
from safetensors.torch import load_file
from transformers import GenerationConfig, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.experimental.ppo import PPOTrainer
from trl.experimental.ppo.ppo_trainer import batch_generation, generate, truncate_response
from trl.experimental.utils import get_reward
from trl.models.utils import unwrap_model_for_generation

from .checkpoint import restore_rng_state, save_rng_state, save_whole_tensors, staged_checkpoint
from .distributed import (gather_optimizer_state, gather_weights, loss_scale_state, optimizer_step, restore_loss_scale,
                          restore_optimizer_state, restore_scheduler, restore_weights)
from .errors import RunStopped, UserError
from .loader import gathered_if_zero3
from .stage import finite_on_every_rank, no_gradient_loss

logger = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
# A checkpoint-N holds the policy at update N as an sft output, and what a resume needs besides:
WEIGHTS_FILE = "trained_weights.safetensors"  # every trained tensor of policy and value model, fp32, whole
OPTIMIZER_FILE = "optimizer.safetensors"  # their optimizer state (Adam moments, a momentum buffer, ...), whole
PPO_STATE_FILE = "ppo_state.json"  # scheduler, optimizer step count, the run's shape
STATE_FILE = "trainer_state.json"  # update count, episodes, log history
RNG_FILE = "rng_state_{rank}.safetensors"  # every rank's random generators


def truncated_sampling(generate: Callable[..., Any], top_k: int, top_p: float) -> Callable[..., Any]:
    """Wrap a policy's `generate` so rollouts sample with top-k / top-p.

    TRL samples from the whole temperature-scaled distribution and takes the rollout
    log-probs from `output.scores`. With truncation those scores would be the truncated,
    renormalised distribution, while the PPO update recomputes log-probs from the whole one,
    so ratio and KL would be biased from the first step. The scores handed back are
    therefore the raw logits over the temperature: the truncation only picks the tokens.
    """

    def generate_truncated(*args: Any, generation_config: GenerationConfig, **kwargs: Any):
        config = copy.deepcopy(generation_config)
        config.top_k, config.top_p = top_k, top_p
        output = generate(*args, generation_config=config, output_logits=True, **kwargs)
        output.scores = tuple(logits / config.temperature for logits in output.logits)
        return output

    return generate_truncated


class ResponseLogits:
    """A policy's logits at the response positions only, where TRL's PPO loop computes them for the whole sequence.

    TRL's loop runs the policy through its module-level `forward` and keeps
    `output.logits[:, prompt_width - 1:-1]`: the LM head also runs over every prompt position,
    and under autograd that [batch, sequence, vocabulary] tensor and the zero-filled gradient
    of its slice are the largest tensors of a PPO update. `ResponseLogitsHooks` have the head run
    from the last prompt position on (transformers' `logits_to_keep`) and hand TRL this object in
    place of `output.logits`: indexing it with that one slice gives the same values. Any other
    use raises, so a TRL that reads the logits differently fails at once instead of training on
    the wrong positions.
    """

    def __init__(self, logits: torch.Tensor, prompt_width: int) -> None:
        self.logits, self.prompt_width = logits, prompt_width  # at positions prompt_width - 1 to the one before last

    def __getitem__(self, key: Any) -> torch.Tensor:
        if key != (slice(None), slice(self.prompt_width - 1, -1)):
            raise TypeError(f"TRL's PPO loop indexed the policy's logits with {key}; this project computes them "
                            f"at response positions only and supports [:, {self.prompt_width - 1}:-1] alone "
                            f"(trl < 1.13).")
        return self.logits


class RolloutScores:
    """The generation scores of a rollout as TRL's loop reads them: chunk by chunk, each once.

    TRL's `batch_generation` returns the scores of every generated token, [rollouts, response
    length, vocabulary], and its loop holds them through all PPO epochs although it reads them
    once, `scores[start:start + chunk_size]` for each rollout chunk, for the rollout's
    log-probs. Here each chunk is dropped as it is handed out; any other index raises.
    """

    def __init__(self, chunks: list[torch.Tensor], chunk_size: int) -> None:
        self.chunks: list[torch.Tensor | None] = list(chunks)
        self.chunk_size = chunk_size

    def __getitem__(self, key: Any) -> torch.Tensor:
        whole_chunk = (isinstance(key, slice) and isinstance(key.start, int) and key.step is None
                       and key.stop == key.start + self.chunk_size and key.start % self.chunk_size == 0)
        index = key.start // self.chunk_size if whole_chunk else len(self.chunks)
        if index >= len(self.chunks) or self.chunks[index] is None:
            raise TypeError(f"TRL's PPO loop indexed the rollout's generation scores with {key}; this project hands "
                            f"out each chunk of {self.chunk_size} rollouts once (trl < 1.13).")
        chunk, self.chunks[index] = self.chunks[index], None
        return chunk


@torch.no_grad()
def generation_by_chunks(model: torch.nn.Module, queries: torch.Tensor, chunk_size: int, pad_token_id: int,
                         generation_config: GenerationConfig) -> tuple[torch.Tensor, RolloutScores]:
    """TRL's `batch_generation`, its scores handed back as `RolloutScores` (same values, chunk by chunk).

    Each chunk goes through TRL's `generate`, as in `batch_generation`, and its scores are kept as
    generated: only a chunk shorter than the longest is copied, right-padded as TRL pads them
    (pad token; zero scores).
    """
    chunks = [generate(model, queries[start:start + chunk_size], pad_token_id, generation_config)
              for start in range(0, queries.shape[0], chunk_size)]
    length = max(part.shape[1] for part, _ in chunks)
    query_responses = torch.cat([torch.nn.functional.pad(part, (0, length - part.shape[1]), value=pad_token_id)
                                 for part, _ in chunks])
    scores = [chunk_scores if part.shape[1] == length else
              torch.nn.functional.pad(chunk_scores, (0, 0, 0, length - part.shape[1])) for part, chunk_scores in chunks]
    return query_responses, RolloutScores(scores, chunk_size)


def rollout_pad_token(tokenizer: PreTrainedTokenizerBase, prompt_sets: list[Any]) -> str | None:
    """The pad token of TRL's rollouts where the tokenizer pads with its eos; None where it pads with another token.

    TRL tells padding from tokens by the pad id alone. With pad == eos (SmolLM2, Qwen, ...) it would mask
    every eos inside a prompt (the `<|im_end|>` closing each ChatML turn) out of attention, and take the eos
    that ends an answer for padding: its log-prob would leave the loss, so the policy would never learn to
    end an answer. The rollouts pad instead with a special token (unk first) that is not eos and that no
    prompt holds; `prompt_sets` are the datasets of prompts (an `input_ids` column each; None is skipped).
    """
    if tokenizer.pad_token_id != tokenizer.eos_token_id:
        return None
    used = {token for prompts in prompt_sets if prompts is not None for row in prompts["input_ids"] for token in row}
    candidates = [tokenizer.unk_token, *tokenizer.all_special_tokens]
    for token in candidates:
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if token_id is not None and token_id != tokenizer.eos_token_id and token_id not in used:
            return token
    raise UserError(f"the tokenizer pads with its eos token {tokenizer.eos_token!r} and every other special token "
                    f"occurs in the prompts, so PPO's rollouts cannot tell padding from tokens; give the tokenizer "
                    f"a pad token of its own (tokenizer_config.json) in --model_name_or_path.")


def score_positions(query_responses: torch.Tensor, lengths: torch.Tensor, skipped_id: int) -> torch.Tensor:
    """Where the reward model scores each rollout: at `lengths` (TRL's last real token), one earlier where that
    token is `skipped_id`.

    The rm pools at the last token that is not its pad id; with pad == eos that is the last token before the
    eos closing the answer, and the rollouts are scored at the same place.
    """
    rows = torch.arange(query_responses.shape[0], device=query_responses.device)
    return lengths - (query_responses[rows, lengths] == skipped_id).long()


class ResponseLogitsHooks:
    """Hooks on a policy: inside `active(prompt_width)` its LM head runs from the last prompt position on.

    The policy's output then carries `ResponseLogits`; outside, and for a model whose forward
    takes no `logits_to_keep`, it is left alone.
    """

    def __init__(self, policy: torch.nn.Module) -> None:
        self.prompt_width: int | None = None
        causal_lm = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        if "logits_to_keep" in inspect.signature(causal_lm.forward).parameters:
            policy.register_forward_pre_hook(self._keep_response_positions, with_kwargs=True)
            policy.register_forward_hook(self._wrap_logits)

    @contextlib.contextmanager
    def active(self, prompt_width: int) -> Iterator[None]:
        self.prompt_width = prompt_width
        try:
            yield
        finally:
            self.prompt_width = None

    def _keep_response_positions(self, module: torch.nn.Module, args: tuple,
                                 kwargs: dict) -> tuple[tuple, dict] | None:
        if self.prompt_width is None:
            return None
        # Positions prompt_width - 1 (it predicts the first response token) to the one before last;
        # exactly those, so that no slice of the logits (and no zero-filled gradient) is left to take.
        # TRL asks for the hidden states too and never reads the policy's: without them, the output
        # it keeps until the end of a mini-batch holds no layer's activations.
        input_ids = kwargs["input_ids"]
        positions = torch.arange(self.prompt_width - 1, input_ids.shape[1] - 1, device=input_ids.device)
        return args, {**kwargs, "logits_to_keep": positions, "output_hidden_states": False}

    def _wrap_logits(self, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        if self.prompt_width is None:
            return None
        output.logits = ResponseLogits(output.logits, self.prompt_width)
        return output


class AdapterOffReward(torch.nn.Module):
    """The reward model as the value model with its LoRA adapter disabled: one backbone for both.

    With LoRA the value model is the rm's weights plus a fresh adapter (and a trained copy of
    the head), so disabling the adapter gives back the rm exactly; a separate reward model
    would hold a second copy of the same weights. TRL scores with `getattr(model,
    model.base_model_prefix)(...)` and then `model.score(hidden)`: here the backbone call runs
    the value model's backbone with its adapter off, and `score` is a frozen copy of the rm's
    own head. That head is the only parameter of this module, the only one TRL prepares or
    moves: the value model belongs to the training engine and is deliberately no submodule.
    """

    base_model_prefix = "backbone"

    def __init__(self, value: Any) -> None:
        super().__init__()
        head = value.get_base_model().score
        head = getattr(head, "original_module", head)  # peft keeps the rm's head beside the trained copy
        with gathered_if_zero3(head), torch.no_grad():  # under ZeRO-3 each rank holds a shard of it
            self.score = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                                         dtype=head.weight.dtype, device=head.weight.device)
            self.score.load_state_dict(head.state_dict())
        self.score.requires_grad_(False)
        object.__setattr__(self, "value", value)  # a plain attribute: not registered, not prepared twice
        self.config = value.get_base_model().config  # TRL's DeepSpeed set-up reads the hidden size

    def backbone(self, **kwargs: Any) -> Any:
        model = self.value.get_base_model()
        with self.value.disable_adapter():
            return getattr(model, model.base_model_prefix)(**kwargs)


class PromptBatches:
    """Every update's prompts, each rank its share, in an order that is a function of (seed, epoch).

    TRL's dataloader shuffles with the global torch generator, whose draws a resumed run
    cannot replay. Here epoch e deals a permutation seeded with seed + e, global batches of
    local_batch_size x ranks (the tail that fills no whole batch is left out, as TRL does), and
    a resumed run starts with the batch after its checkpoint's last update. TRL iterates the
    object anew at the end of every epoch.
    """

    def __init__(self, dataset: Any, collate: Callable[[list[dict]], dict], local_batch_size: int, rank: int,
                 world_size: int, seed: int, position: int = 0) -> None:
        self.dataset, self.collate, self.local, self.rank, self.seed = dataset, collate, local_batch_size, rank, seed
        self.global_batch = local_batch_size * world_size
        self.per_epoch = len(dataset) // self.global_batch
        self.position = position  # batches handed out so far, over all epochs
        self.prompt_width = 0  # columns of the prompts handed out last (TRL's context_length)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, first = divmod(self.position, self.per_epoch)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        for index in range(first, self.per_epoch):
            start = index * self.global_batch + self.rank * self.local
            self.position += 1
            batch = self.collate([self.dataset[i] for i in order[start:start + self.local]])
            self.prompt_width = batch["input_ids"].shape[1]
            yield batch


class ContinueRun(TrainerCallback):
    """Put a checkpoint's update count, log history and random generators back as training begins.

    TRL's `train()` starts its state from zero and then calls `on_train_begin`: this callback
    (first in line, before the progress bar reads the state) sets the saved values there.
    """

    def __init__(self, checkpoint: Path, rank: int, total_updates: int) -> None:
        self.checkpoint, self.rank, self.total_updates = checkpoint, rank, total_updates

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        saved = json.loads((self.checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        state.global_step, state.episode = saved["global_step"], saved["episode"]
        state.log_history = saved["log_history"]
        state.max_steps = self.total_updates
        restore_rng_state(self.checkpoint / RNG_FILE.format(rank=self.rank))


def check_checkpoint(path: Path, world_size: int) -> dict[str, Any]:
    """The ppo_state of a ppo checkpoint folder; a UserError naming what is missing or different."""
    needed = [WEIGHTS_FILE, OPTIMIZER_FILE, PPO_STATE_FILE, STATE_FILE,
              *(RNG_FILE.format(rank=rank) for rank in range(world_size))]
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise UserError(f"--resume_from_checkpoint {path} lacks {', '.join(missing)}; give a checkpoint-N folder "
                        f"written by stages.ppo with the same number of ranks.")
    return json.loads((path / PPO_STATE_FILE).read_text(encoding="utf-8"))


def load_trained_weights(path: Path, policy: torch.nn.Module, value: torch.nn.Module) -> None:
    """Give the policy and value models the trained tensors of a checkpoint (before DeepSpeed copies them)."""
    weights = load_file(str(path / WEIGHTS_FILE))
    for prefix, module in (("policy.", policy), ("value_model.", value)):
        trained = {name: param for name, param in module.named_parameters() if param.requires_grad}
        saved = {key[len(prefix):]: tensor for key, tensor in weights.items() if key.startswith(prefix)}
        if saved.keys() != trained.keys():
            raise UserError(f"--resume_from_checkpoint {path}: its trained {prefix[:-1]} tensors are not this run's "
                            f"({len(saved)} saved, {len(trained)} here); resume with the arguments of the run that "
                            f"wrote it (its run_config.json).")
        with torch.no_grad():
            for name, param in trained.items():
                param.copy_(saved[name])


class PolicyTrainer(PPOTrainer):
    """PPOTrainer that saves under DeepSpeed, resumes, stops on a NaN loss, samples with top-k/top-p.

    - `save_model` writes the policy alone, like an sft output (adapter folder, or full model)
      plus tokenizer, gathering ZeRO-3 shards first (TRL's own save breaks under DeepSpeed).
    - `checkpoint-N` holds the policy at update N and everything a resume needs (TRL's PPO
      saves none of it): trained weights and optimizer state as whole tensors, the scheduler,
      the update count, every rank's random generators; the prompts come from `PromptBatches`.
      It is written under output_dir/.saving/ and renamed whole once every rank is done.
      `resume_from` continues such a run exactly where its checkpoint left it.
    - a non-finite PPO loss stops the run before its backward pass (`nan_policy="stop"`) or
      contributes no gradient and is counted (`"skip"`); every rank takes the same decision.
    - every `sample_steps` updates, a table of prompts, sampled responses and rewards goes to
      W&B (rank 0) and to output_dir/samples.jsonl, drawn with the random generators set aside.
    - the whole loop runs under the accelerator's autocast (mixed precision with frozen weights
      in bf16/fp16 and trained ones in fp32).
    - the policy's LM head runs at response positions only where TRL's loop takes its logits
      (`ResponseLogits`), and the generation scores are dropped once read (`RolloutScores`).
    - optimizer parameter groups that are empty (e.g. no bias/norm weight trains under LoRA)
      are dropped before the LR scheduler is built: DeepSpeed drops them in place, which
      would leave TRL's scheduler with more learning rates than groups.
    - a tokenizer that pads with its eos pads the rollouts with another token (`rollout_pad_token`),
      and the reward is taken where the rm pools (`score_positions`); the policy is saved with the
      tokenizer as given.
    """

    def __init__(self, *args: Any, top_k: int = 0, top_p: float = 1.0, sample_steps: int = 0,
                 nan_policy: str = "stop", resume_from: str | None = None, **kwargs: Any):
        checkpoint = Path(resume_from) if resume_from else None
        if checkpoint is not None:  # before DeepSpeed builds its fp32 master from the modules
            load_trained_weights(checkpoint, kwargs["model"], kwargs["value_model"])
        tokenizer = kwargs["processing_class"]
        pad = rollout_pad_token(tokenizer, [kwargs["train_dataset"], kwargs.get("eval_dataset")])
        if pad is not None:  # TRL's collator, generation and masks all take the pad from processing_class
            kwargs["processing_class"] = copy.deepcopy(tokenizer)
            kwargs["processing_class"].pad_token = pad
            logger.info("rollouts pad with %s: the tokenizer pads with its eos", pad)
        super().__init__(*args, **kwargs)
        self.saved_tokenizer = tokenizer
        self.score_skipped_id = tokenizer.pad_token_id if pad is not None else None
        if top_k > 0 or top_p < 1.0:
            self.policy_model.generate = truncated_sampling(self.policy_model.generate, top_k, top_p)
        # TRL offers samples when (update - 1) % freq == 0, counting from the run's start: it offers
        # them every update and `generate_completions` decides from the (resumed) update count.
        self.sample_steps, self.sample_generations_freq = sample_steps, 1
        self.nan_policy, self.skipped_batches = nan_policy, 0
        self.accelerator.backward = self._checked_backward(self.accelerator.backward)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        done = 0
        if checkpoint is not None:
            done = self._restore(checkpoint, world)
            self.callback_handler.callbacks.insert(0, ContinueRun(checkpoint, rank, self.args.num_total_batches))
            self.args.num_total_batches -= done  # TRL's loop counts the updates still to run
        self.dataloader = PromptBatches(self.train_dataset, self.data_collator, self.args.local_batch_size, rank,
                                        world, self.args.seed, position=done)
        self.response_logits = ResponseLogitsHooks(self.policy_model)  # on while TRL's `forward` runs, see `train`

    def _restore(self, checkpoint: Path, world_size: int) -> int:
        """Trained fp32 weights, optimizer and scheduler state of `checkpoint`; the number of updates it had done."""
        state = check_checkpoint(checkpoint, world_size)
        shape = {"world_size": world_size, "local_batch_size": self.args.local_batch_size,
                 "total_updates": self.args.num_total_batches}
        if {key: state[key] for key in shape} != shape:
            raise UserError(f"--resume_from_checkpoint {checkpoint} was written by a run of another shape "
                            f"({ {key: state[key] for key in shape} }, this one: {shape}); resume with the same ranks, "
                            f"batch sizes and run length.")
        wrapper = self.accelerator.unwrap_model(self.model)
        # With --bf16/--fp16 DeepSpeed built its fp32 master from the weights cast to that dtype: the
        # saved fp32 values go into the master again (else the next steps start from rounded weights).
        restore_weights(wrapper, self.optimizer, load_file(str(checkpoint / WEIGHTS_FILE)))
        restore_optimizer_state(wrapper, self.optimizer, load_file(str(checkpoint / OPTIMIZER_FILE)),
                                state["optimizer_step"])
        restore_loss_scale(self.optimizer, state.get("loss_scale"))
        restore_scheduler(self.lr_scheduler, state["scheduler"])
        logger.info("resuming from %s after update %d", checkpoint, state["updates"])
        return state["updates"]

    def _checked_backward(self, backward: Callable[..., None]) -> Callable[..., None]:
        """Wrap the accelerator's backward (TRL's loop calls it once per PPO micro-batch) with the NaN policy."""

        def checked_backward(loss: torch.Tensor, **kwargs: Any) -> None:
            if not finite_on_every_rank(loss, self.accelerator.num_processes):
                update = self.state.global_step + 1
                if self.nan_policy == "stop":
                    raise RunStopped(f"the PPO loss is {loss.detach().float().item()} at update {update} (on this "
                                     f"rank or another); the run stopped and the checkpoints in {self.args.output_dir} "
                                     f"are intact. Lower --learning_rate or --kl_coef and resume with "
                                     f"--resume_from_checkpoint last, or pass --nan_policy skip to drop such batches.")
                self.skipped_batches += 1
                logger.warning("non-finite PPO loss at update %d: micro-batch skipped (%d so far)", update,
                               self.skipped_batches)
                loss = no_gradient_loss(self.model.parameters())
            backward(loss, **kwargs)

        return checked_backward

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.skipped_batches:
            logs["skipped_batches"] = self.skipped_batches
        super().log(logs, *args, **kwargs)

    def train(self):
        # TRL scores rollouts (generate, reward, value) outside the accelerator's autocast; with
        # --bf16/--fp16 our frozen weights are in that dtype and trained ones (LoRA, value head)
        # in fp32, so the whole loop runs under it (a no-op in fp32).
        with self.accelerator.autocast(), self._lean_loop_helpers():
            return super().train()

    @contextlib.contextmanager
    def _lean_loop_helpers(self) -> Iterator[None]:
        """While TRL's loop runs, three module-level helpers it calls are replaced.

        - `forward`, where TRL takes the policy's logits (the reference log-probs of a rollout,
          every PPO micro-batch): the policy computes them at response positions only
          (`ResponseLogits`). Generation and scoring do not go through it.
        - `batch_generation`: the generation scores come back as `RolloutScores`, each chunk
          dropped once the rollout has read it instead of kept through every PPO epoch.
        - `get_reward`: the reward model's score is taken where the rm pools (`_reward`).
        """
        trl_forward, trl_batch_generation, trl_get_reward = (trl_ppo.forward, trl_ppo.batch_generation,
                                                             trl_ppo.get_reward)

        def forward(model: torch.nn.Module, query_responses: torch.Tensor, pad_token_id: int) -> Any:
            with self.response_logits.active(self.dataloader.prompt_width):
                return trl_forward(model, query_responses, pad_token_id)

        def reward_or_value(model: torch.nn.Module, query_responses: torch.Tensor, pad_token_id: int,
                            context_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            if model is self.reward_model:
                return self._reward(query_responses, pad_token_id, context_length)
            return trl_get_reward(model, query_responses, pad_token_id, context_length)

        trl_ppo.forward, trl_ppo.batch_generation, trl_ppo.get_reward = forward, generation_by_chunks, reward_or_value
        try:
            yield
        finally:
            trl_ppo.forward, trl_ppo.batch_generation, trl_ppo.get_reward = (trl_forward, trl_batch_generation,
                                                                             trl_get_reward)

    def _reward(self, query_responses: torch.Tensor, pad_token_id: int,
                context_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """TRL's `get_reward` of the reward model, the score taken where the rm pools (`score_positions`)."""
        logits, scores, lengths = get_reward(self.reward_model, query_responses, pad_token_id, context_length)
        if self.score_skipped_id is None:
            return logits, scores, lengths
        positions = score_positions(query_responses, lengths, self.score_skipped_id)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits, logits[rows, positions].squeeze(-1), positions

    def create_optimizer(self):
        optimizer = super().create_optimizer()
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    def generate_completions(self, sampling: bool = False) -> None:
        """Every `sample_steps` updates: sample answers to held-out prompts, log them with their rewards.

        The sampling draws from generators set aside, so a run with sample tables trains exactly
        as one without (and a resumed run as the uninterrupted one).
        """
        if self.sample_steps <= 0 or (self.state.global_step - 1) % self.sample_steps:
            return
        numpy_state = np.random.get_state()
        device_type = self.accelerator.device.type  # the CPU generator is always set aside; an accelerator's too
        with torch.random.fork_rng(devices=[] if device_type == "cpu" else None, device_type=device_type):
            self._log_samples()
        np.random.set_state(numpy_state)

    def _log_samples(self) -> None:
        batch = next(iter(self.eval_dataloader), None)
        if batch is None:  # fewer held-out prompts than one evaluation batch
            return
        pad_id = self.processing_class.pad_token_id
        queries = batch["input_ids"]
        context_length = queries.shape[1]
        config = GenerationConfig(max_new_tokens=self.args.response_length, temperature=self.args.temperature + 1e-7,
                                  top_k=0, top_p=1.0, do_sample=True)
        gather = self.args.ds3_gather_for_generation
        with torch.no_grad(), unwrap_model_for_generation(self.model, self.accelerator,
                                                          gather_deepspeed3_params=gather) as unwrapped:
            query_responses, _ = batch_generation(unwrapped.policy, queries, queries.shape[0], pad_id, config)
            responses = query_responses[:, context_length:]
            if self.stop_token_id is not None:
                responses = truncate_response(self.stop_token_id, pad_id, responses)
            _, scores, _ = self._reward(torch.cat((queries, responses), 1), pad_id, context_length)
        decode = self.processing_class.batch_decode
        rows = gather_object([list(row) for row in zip(decode(queries, skip_special_tokens=True),
                                                       decode(responses, skip_special_tokens=True),
                                                       scores.float().tolist())])
        if not self.accelerator.is_main_process:
            return
        step = self.state.global_step
        with open(Path(self.args.output_dir) / SAMPLES_FILE, "a", encoding="utf-8") as file:
            for prompt, response, reward in rows:
                file.write(json.dumps({"step": step, "prompt": prompt, "response": response, "reward": reward},
                                      ensure_ascii=False) + "\n")
        if "wandb" in (self.args.report_to or []):
            import wandb

            if wandb.run is not None:
                table = wandb.Table(columns=["step", "prompt", "response", "reward"],
                                    data=[[step, *row] for row in rows])
                wandb.log({"ppo/samples": table, "train/global_step": step})

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        output_dir = output_dir or self.args.output_dir
        # Every rank takes part: under ZeRO-3 this gathers the shards (16-bit weights on rank 0).
        state_dict = self.accelerator.get_state_dict(self.model)
        if not self.accelerator.is_main_process:
            return
        policy = self.accelerator.unwrap_model(self.model).policy
        prefix = "policy."
        policy.save_pretrained(output_dir, state_dict={key[len(prefix):]: value for key, value in state_dict.items()
                                                       if key.startswith(prefix)}, safe_serialization=True)
        self.saved_tokenizer.save_pretrained(output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """checkpoint-N: the policy (as an sft output) and a resume's state, written aside, renamed whole."""
        main = self.accelerator.is_main_process
        with staged_checkpoint(Path(self.args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}",
                               main=main, barrier=self.accelerator.wait_for_everyone,
                               save_total_limit=self.args.save_total_limit) as staged:
            staging = staged.folder
            self.save_model(str(staging))  # every rank takes part (ZeRO-3 gathers), rank 0 writes
            wrapper = self.accelerator.unwrap_model(self.model)
            # collective: every rank takes part
            weights = gather_weights(wrapper, self.optimizer)
            optimizer_state = gather_optimizer_state(wrapper, self.optimizer)
            staging.mkdir(parents=True, exist_ok=True)
            save_rng_state(staging / RNG_FILE.format(rank=self.accelerator.process_index))
            if main:
                for tensors, file in ((weights, WEIGHTS_FILE), (optimizer_state, OPTIMIZER_FILE)):
                    save_whole_tensors(tensors, staging / file)
                ppo_state = {"updates": self.state.global_step, "optimizer_step": optimizer_step(self.optimizer),
                             "loss_scale": loss_scale_state(self.optimizer),
                             "scheduler": self.lr_scheduler.state_dict(), "world_size": self.accelerator.num_processes,
                             "local_batch_size": self.args.local_batch_size,
                             "total_updates": self.state.max_steps}
                (staging / PPO_STATE_FILE).write_text(json.dumps(ppo_state, indent=2), encoding="utf-8")
                self.state.save_to_json(str(staging / STATE_FILE))
