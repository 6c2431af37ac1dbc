"""ppo: the policy learns to please a reward model, with a KL penalty to a frozen reference.

    python -m stages.ppo config.yaml [--key value ...]
    deepspeed launch/ppo.sh config.yaml [--key value ...]

Built on TRL's PPO trainer (`trl.experimental.ppo`, trl < 1.13). The policy starts from an sft
output (`--adapter_name_or_path` for a LoRA output, `--model_name_or_path` for a full model);
`--reward_model` is an rm output directory, which is both the reward and the start of the
value model. With LoRA the policy trains a fresh adapter on top of the (merged) sft weights,
and the reference is the same model with that adapter disabled; likewise the value model
trains a fresh adapter on the rm's weights, and the reward model is the value model with its
adapter disabled: no second copy of either. With full tuning the reference and the reward
model are separate frozen copies (TRL's default).

Prompts come from any registered non-pairwise dataset (alpaca or sharegpt; the answers are
ignored). One PPO update = one batch of per_device_train_batch_size x gradient_accumulation_steps
prompts per rank: generate, score, then `ppo_epochs` passes over it in `num_mini_batches`
mini-batches. Run length: `--max_steps` updates, or `--num_train_epochs` passes over the prompts.

Checkpoints (`--save_steps` updates) hold the policy like an sft output plus the trained value
model, optimizer state, scheduler and every rank's random generators (stages/core/ppo_trainer.py), so
`--resume_from_checkpoint last` continues a killed run exactly, on the same ranks and batch sizes.
A NaN/inf PPO loss stops the run (or, with `--nan_policy skip`, adds no gradient and is counted).

The trained policy is saved like an sft output (adapter folder or full model + tokenizer). A
LoRA policy trained on top of an sft adapter is relative to it: pass both to later stages,
`--adapter_name_or_path SFT_OUT,PPO_OUT` (sft --do_predict, export).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core.errors import UserError, main_guard

if TYPE_CHECKING:
    from .core.arguments import FinetuningArguments, ModelArguments, PPOArguments, RunArguments


def reward_model_args(reward_model: str | None, trust_remote_code: bool = False):
    """Model arguments that rebuild the rm output `reward_model` (inherited from its run_config.json).

    A full rm output is its own checkpoint. A LoRA one is its base, the LM adapters the rm
    merged before training (e.g. an sft adapter), then the rm adapter itself.
    """
    from .core.arguments import ModelArguments, split_names
    from .core.loader import has_value_head
    from .core.stage import CONFIG_FILE

    if not reward_model:
        raise UserError("--reward_model is required: an rm output directory (python -m stages.rm).")
    folder = Path(reward_model)
    if not folder.is_dir():
        raise UserError(f"--reward_model {reward_model} is not a directory; pass an rm output directory.")
    if not has_value_head(reward_model):
        raise UserError(f"--reward_model {reward_model} holds no value head (score.weight), so it is not an rm "
                        f"output; train one with python -m stages.rm and pass its output_dir.")
    if not (folder / "adapter_config.json").is_file():
        return ModelArguments(model_name_or_path=reward_model, trust_remote_code=trust_remote_code)
    run_file = folder / CONFIG_FILE
    run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.is_file() else {}
    base = run.get("model_name_or_path") or json.loads((folder / "adapter_config.json").read_text())[
        "base_model_name_or_path"]
    earlier = split_names(run.get("adapter_name_or_path"))
    if earlier and not run.get("create_new_adapter") and has_value_head(earlier[-1]):
        earlier = earlier[:-1]  # the rm resumed that adapter: its output supersedes it
    return ModelArguments(model_name_or_path=base, adapter_name_or_path=",".join([*earlier, reward_model]),
                          quantization_bit=run.get("quantization_bit"),
                          quantization_type=run.get("quantization_type", "nf4"),
                          double_quantization=run.get("double_quantization", True),
                          trust_remote_code=trust_remote_code)


def check_ppo_args(model_args: ModelArguments, training_args: Any, ppo_args: PPOArguments) -> None:
    """What ppo refuses in its arguments beyond the checks of every trainer stage."""
    from .core.distributed import optim_flag_problem

    if model_args.quantization_bit is not None and model_args.adapters:
        raise UserError("a quantized policy cannot merge its sft adapter under the PPO adapter; export the sft model "
                        "first (python -m stages.export) and pass it as --model_name_or_path.")
    rollouts = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    if rollouts % ppo_args.num_mini_batches or (ppo_args.whiten_rewards and rollouts // ppo_args.num_mini_batches < 8):
        raise UserError(f"--num_mini_batches {ppo_args.num_mini_batches} must divide per_device_train_batch_size x "
                        f"gradient_accumulation_steps = {rollouts} (into >= 8 rollouts each with --whiten_rewards).")
    problem = optim_flag_problem(training_args)
    if problem:
        optim = getattr(training_args.optim, "value", training_args.optim)
        raise UserError(f"--optim {optim}: ppo checkpoints hold the optimizer state as one whole tensor per parameter, "
                        f"and {problem}; use adamw_torch (the default), sgd or rmsprop.")


def prompt_sets(dataset_module: Any, batch_size: int, world: int, eval_batch_size: int) -> tuple[Any, Any]:
    """The training prompts (at least one update of `batch_size`) and the prompts sampled for the log (the eval
    set, else the first training ones)."""
    train_prompts = dataset_module.train_dataset.remove_columns("labels")  # the reference answers are unused
    if len(train_prompts) < batch_size:  # TRL would wait forever for a first whole batch
        raise UserError(f"{len(train_prompts)} training prompts fill no update of {batch_size} (per_device_train_batch_"
                        f"size x gradient_accumulation_steps x {world} ranks); add prompts or lower those flags.")
    if dataset_module.eval_dataset is not None:
        return train_prompts, dataset_module.eval_dataset.remove_columns("labels")
    return train_prompts, train_prompts.select(range(min(len(train_prompts), eval_batch_size * world)))


def load_models(tokenizer: Any, model_args: ModelArguments, reward_args: ModelArguments,
                finetuning_args: FinetuningArguments, training_args: Any,
                ppo_args: PPOArguments) -> tuple[Any, Any, Any, Any]:
    """policy, reference (None with LoRA: the policy with its adapter off), reward model, value model."""
    import torch

    from .core.arguments import FinetuningArguments
    from .core.loader import get_compute_dtype, load_model
    from .core.ppo_trainer import AdapterOffReward

    dtype = get_compute_dtype(training_args.bf16, training_args.fp16)
    checkpointing = training_args.gradient_checkpointing
    # A fresh adapter on top of the merged sft weights: disabling it gives back the sft policy.
    new_adapter = dataclasses.replace(finetuning_args, create_new_adapter=True)
    policy = load_model(tokenizer, model_args, new_adapter, is_trainable=True, compute_dtype=dtype,
                        gradient_checkpointing=checkpointing)
    lora = finetuning_args.finetuning_type == "lora"
    reference = None if lora else load_model(tokenizer, model_args, finetuning_args, is_trainable=False,
                                             compute_dtype=dtype)
    value = load_model(tokenizer, reward_args, new_adapter, is_trainable=True, compute_dtype=dtype,
                       gradient_checkpointing=checkpointing, add_valuehead=True)
    # With LoRA the value model is the rm's weights plus a fresh adapter, so the reward model is that
    # model with its adapter disabled: no second copy. (A quantized LoRA rm cannot merge its adapter:
    # its value model trains that adapter on, and the reward needs its own frozen copy.)
    if lora and not (reward_args.quantization_bit is not None and reward_args.adapters):
        reward = AdapterOffReward(value)
    else:
        reward = load_model(tokenizer, reward_args, FinetuningArguments(), is_trainable=False, compute_dtype=dtype,
                            add_valuehead=True)
        reward = reward.get_base_model() if hasattr(reward, "get_base_model") else reward
    # TRL calls the backbone and `.score` of the value model: hand it the transformers model inside
    # the PEFT wrapper (its LoRA layers stay active and trainable).
    value = value.get_base_model() if hasattr(value, "get_base_model") else value
    if checkpointing:  # TRL's PPO loop never turns it on itself
        for model in (policy, value):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if ppo_args.reward_clip is not None:
        reward.score = torch.nn.Sequential(reward.score, torch.nn.Hardtanh(-ppo_args.reward_clip, ppo_args.reward_clip))
    return policy, reference, reward, value


def ppo_config(training_args: Any, ppo_args: PPOArguments, num_updates: int, batch_size: int) -> Any:
    """TRL's PPOConfig: every TrainingArguments value of the run (DeepSpeed goes through `accelerate_env`),
    plus the PPO settings."""
    from transformers import TrainingArguments
    from trl.experimental.ppo import PPOConfig

    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    return PPOConfig(
        **{**values, "deepspeed": None}, total_episodes=num_updates * batch_size,
        response_length=ppo_args.max_new_tokens, temperature=ppo_args.temperature, stop_token="eos",
        missing_eos_penalty=ppo_args.missing_eos_penalty, kl_coef=ppo_args.kl_coef,
        kl_estimator=ppo_args.kl_estimator, num_ppo_epochs=ppo_args.ppo_epochs,
        num_mini_batches=ppo_args.num_mini_batches, whiten_rewards=ppo_args.whiten_rewards,
        cliprange=ppo_args.cliprange, cliprange_value=ppo_args.cliprange_value, vf_coef=ppo_args.vf_coef,
        gamma=ppo_args.gamma, lam=ppo_args.lam, num_sample_generations=1 if ppo_args.sample_steps > 0 else 0,
        local_rollout_forward_batch_size=training_args.per_device_train_batch_size)


def save_run(trainer: Any, training_args: Any, run_args: RunArguments) -> None:
    """The policy, and on rank 0 the run's metrics, state and plots."""
    from .core.callbacks import plot_loss

    trainer.save_model()
    if trainer.is_world_process_zero():
        records = [r for r in trainer.state.log_history if "objective/scores" in r]
        metrics = {"train_updates": trainer.state.global_step, "train_episodes": trainer.state.episode,
                   "train_reward_first": records[0]["objective/scores"] if records else None,
                   "train_reward_last": records[-1]["objective/scores"] if records else None}
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        if run_args.plot_loss:
            plot_loss(training_args.output_dir, keys=("objective/scores", "objective/kl", "objective/entropy",
                                                      "loss/value_avg", "loss/policy_avg"))


def run_ppo(argv: list[str] | None = None) -> None:
    # TRL warns at import that trl.experimental is experimental (the docstring says so): noise before every
    # log line and error of this stage.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from transformers import TrainingArguments, set_seed

    from .core.arguments import DataArguments, FinetuningArguments, ModelArguments, PPOArguments, RunArguments
    from .core.callbacks import JsonlLogCallback
    from .core.data import get_dataset
    from .core.data.processors import prompt_only
    from .core.data.template import get_template
    from .core.distributed import accelerate_env
    from .core.loader import check_model_args, load_tokenizer
    from .core.ppo_trainer import PolicyTrainer, check_checkpoint
    from .core.stage import start_stage

    # 1. arguments: the policy's model args, the reward model's (inherited from the rm output)
    (model_args, data_args, training_args, finetuning_args, ppo_args, run_args), run = start_stage(
        "ppo", [ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, PPOArguments, RunArguments],
        argv, trainer=True, train_only=True, checkpoints=True)
    check_ppo_args(model_args, training_args, ppo_args)
    reward_args = reward_model_args(ppo_args.reward_model, model_args.trust_remote_code)
    check_model_args(reward_args, finetuning_args, run.zero_stage)
    if training_args.resume_from_checkpoint:  # checked before any model is loaded
        check_checkpoint(Path(training_args.resume_from_checkpoint), run.world)

    # 2. tokenizer and prompts (a pairwise dataset is refused); left-padded: generation continues right
    #    after each prompt
    tokenizer = load_tokenizer(model_args)
    template = get_template(tokenizer, data_args.template)
    encode = partial(prompt_only, tokenizer=tokenizer, template=template, cutoff_len=data_args.cutoff_len)
    batch_size = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * run.world
    train_prompts, sample_prompts = prompt_sets(get_dataset(data_args, training_args, encode, ranking=False),
                                                batch_size, run.world, training_args.per_device_eval_batch_size)
    tokenizer.padding_side = "left"

    # 3. models: policy (+ reference), reward, value initialised from the reward model
    set_seed(training_args.seed)
    policy, reference, reward, value = load_models(tokenizer, model_args, reward_args, finetuning_args,
                                                   training_args, ppo_args)

    # 4. trainer: precision and DeepSpeed through the environment, then TRL's config from our arguments
    num_updates = training_args.max_steps if training_args.max_steps > 0 else max(
        1, int(training_args.num_train_epochs * len(train_prompts)) // batch_size)
    accelerate_env(training_args, policy, num_updates)
    run.start_wandb()
    trainer = PolicyTrainer(args=ppo_config(training_args, ppo_args, num_updates, batch_size),
                            processing_class=tokenizer, model=policy, ref_model=reference, reward_model=reward,
                            value_model=value, train_dataset=train_prompts, eval_dataset=sample_prompts,
                            callbacks=[JsonlLogCallback()], top_k=ppo_args.sampling_top_k, top_p=ppo_args.top_p,
                            sample_steps=ppo_args.sample_steps, nan_policy=run_args.nan_policy,
                            resume_from=training_args.resume_from_checkpoint)

    # 5. train, save the policy, record the run. TRL runs a full gc.collect() twice per update;
    # freezing what is alive now (libraries, models, data) leaves it only the update's garbage.
    gc.freeze()
    trainer.train()
    gc.unfreeze()
    save_run(trainer, training_args, run_args)


main = main_guard(run_ppo)

if __name__ == "__main__":
    main()
