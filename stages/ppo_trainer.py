"""TRL's PPO trainer (`trl.experimental.ppo`, trl < 1.13) with what the ppo stage needs on top.

Kept apart from stages/ppo.py because defining the subclass imports trl (seconds).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import GenerationConfig
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl.experimental.ppo import PPOTrainer
from trl.experimental.ppo.ppo_trainer import batch_generation, truncate_response
from trl.experimental.utils import get_reward
from trl.models.utils import unwrap_model_for_generation

SAMPLES_FILE = "samples.jsonl"


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


class PolicyTrainer(PPOTrainer):
    """PPOTrainer that saves under DeepSpeed, samples with top-k/top-p and logs sample tables.

    - `save_model` writes the policy alone, like an sft output (adapter folder, or full model)
      plus tokenizer, gathering ZeRO-3 shards first (TRL's own save breaks under DeepSpeed);
      `checkpoint-N` folders hold the policy at update N (TRL's PPO cannot resume, so no
      optimizer state is kept).
    - every `sample_steps` updates, a table of prompts, sampled responses and rewards goes to
      W&B (rank 0) and to output_dir/samples.jsonl.
    - the whole loop runs under the accelerator's autocast (mixed precision with frozen weights
      in bf16/fp16 and trained ones in fp32).
    - optimizer parameter groups that are empty (e.g. no bias/norm weight trains under LoRA)
      are dropped before the LR scheduler is built: DeepSpeed drops them in place, which
      would leave TRL's scheduler with more learning rates than groups.
    """

    def __init__(self, *args: Any, top_k: int = 0, top_p: float = 1.0, sample_steps: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if top_k > 0 or top_p < 1.0:
            self.policy_model.generate = truncated_sampling(self.policy_model.generate, top_k, top_p)
        if sample_steps > 0:  # TRL samples when (update - 1) % sample_generations_freq == 0
            self.sample_generations_freq = sample_steps

    def train(self):
        # TRL scores rollouts (generate, reward, value) outside the accelerator's autocast; with
        # --bf16/--fp16 our frozen weights are in that dtype and trained ones (LoRA, value head)
        # in fp32, so the whole loop runs under it (a no-op in fp32).
        with self.accelerator.autocast():
            return super().train()

    def create_optimizer(self):
        optimizer = super().create_optimizer()
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    def generate_completions(self, sampling: bool = False) -> None:
        """Sample answers to one batch of held-out prompts and log them with their rewards."""
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
            _, scores, _ = get_reward(self.reward_model, torch.cat((queries, responses), 1), pad_id, context_length)
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
        self.processing_class.save_pretrained(output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        self.save_model(os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"))
        if self.accelerator.is_main_process:
            rotate_checkpoints(self.args.output_dir, save_total_limit=self.args.save_total_limit)
