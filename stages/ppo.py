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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

from .core.errors import UserError, main_guard


@dataclass
class PPOArguments:
    reward_model: str | None = field(
        default=None,
        metadata={"help": "rm output directory (python -m stages.rm): scores the answers and initialises the value "
                          "model."},
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per answer during rollouts."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the rollouts."})
    top_k: int = field(default=0, metadata={"help": "Sample from the k most likely tokens (0: all tokens)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1: the whole distribution)."})
    kl_coef: float = field(default=0.05, metadata={"help": "Weight of the per-token KL penalty to the reference."})
    kl_estimator: Literal["k1", "k3"] = field(
        default="k1", metadata={"help": "KL estimator: k1 (log-ratio, unbiased) or k3 (lower variance)."}
    )
    ppo_epochs: int = field(default=4, metadata={"help": "Optimisation passes over each batch of rollouts."})
    num_mini_batches: int = field(
        default=1, metadata={"help": "Mini-batches per pass (must divide per_device batch x accumulation)."}
    )
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Normalise the per-token rewards of a batch (needs >= 8 rollouts per "
                                         "mini-batch and rank)."}
    )
    reward_clip: float | None = field(
        default=None, metadata={"help": "Clip the reward model's score to [-c, c] before the KL penalty is added."}
    )
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtract this from the score of an answer that does not end with eos "
                                        "within max_new_tokens."}
    )
    cliprange: float = field(default=0.2, metadata={"help": "PPO clip range of the policy ratio."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value predictions."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    sample_steps: int = field(
        default=10, metadata={"help": "Every N updates, log a table of prompts, sampled answers and rewards "
                                      "(W&B and samples.jsonl; 0: never)."}
    )

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise UserError(f"--temperature must be positive, got {self.temperature}.")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UserError(f"--top_k must be >= 0 and --top_p in (0, 1]; got {self.top_k} and {self.top_p}.")
        if self.max_new_tokens <= 0 or self.ppo_epochs <= 0 or self.num_mini_batches <= 0:
            raise UserError("--max_new_tokens, --ppo_epochs and --num_mini_batches must be positive.")
        if self.reward_clip is not None and self.reward_clip <= 0:
            raise UserError(f"--reward_clip must be positive, got {self.reward_clip}.")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise UserError(f"--missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}.")


def reward_model_args(reward_model: str | None, trust_remote_code: bool = False):
    """Model arguments that rebuild the rm output `reward_model` (inherited from its run_config.json).

    A full rm output is its own checkpoint. A LoRA one is its base, the LM adapters the rm
    merged before training (e.g. an sft adapter), then the rm adapter itself.
    """
    from .core.stage import CONFIG_FILE
    from .core.arguments import ModelArguments, split_names
    from .core.loader import has_value_head

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


def deepspeed_to_accelerate(training_args, model, num_updates: int) -> None:
    """Give TRL's Accelerator the run's DeepSpeed config through the environment.

    TRL's PPOConfig cannot take `deepspeed=` under the launcher (its `world_size` field shadows
    TrainingArguments.world_size, which the config resolution reads). Our TrainingArguments
    resolved the "auto" batch sizes, clipping and precision already; the model-size "auto"
    values are filled here, and the concrete config is written to output_dir for every rank.
    """
    from .core.distributed import without_round_robin_gradients

    ds_config = training_args.hf_deepspeed_config
    ds_config.trainer_config_finalize(training_args, model, num_updates)
    without_round_robin_gradients(ds_config.config)  # checkpoints gather whole tensors
    if "optimizer" in ds_config.config or "scheduler" in ds_config.config:
        raise UserError(f"--deepspeed {training_args.deepspeed}: ppo builds its own optimizer and scheduler; remove "
                        f"the optimizer/scheduler sections (or use ds_configs/*.json).")
    path = Path(training_args.output_dir) / "deepspeed_config.json"
    partial_path = path.with_name(f".{path.name}.rank{os.environ.get('RANK', '0')}")
    partial_path.write_text(json.dumps(ds_config.config, indent=2), encoding="utf-8")
    partial_path.replace(path)  # atomic: ranks write identical content, none reads a partial file
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(path.resolve())


def run_ppo(argv: list[str] | None = None) -> None:
    # TRL warns at import that trl.experimental is experimental (the docstring says so): noise before every
    # log line and error of this stage.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from transformers import TrainingArguments, set_seed
    from trl.experimental.ppo import PPOConfig

    from .core.callbacks import JsonlLogCallback, init_wandb, plot_loss
    from .core.stage import prepare_output_dir, resolved_config, save_config
    from .core.data import get_dataset
    from .core.data.processors import prompt_only
    from .core.data.template import get_template
    from .core.distributed import unsupported_optim, zero_stage
    from .core.arguments import (DataArguments, FinetuningArguments, ModelArguments, RunArguments, check_optim_installed,
                          parse_args)
    from .core.loader import check_model_args, get_compute_dtype, load_model, load_tokenizer
    from .core.ppo_trainer import AdapterOffReward, PolicyTrainer, check_checkpoint

    # 1. arguments: the policy's model args, the reward model's (inherited from the rm output)
    model_args, data_args, training_args, finetuning_args, ppo_args, run_args = parse_args(
        [ModelArguments, DataArguments, TrainingArguments, FinetuningArguments, PPOArguments, RunArguments], argv,
        "ppo")
    stage = zero_stage(training_args.deepspeed)
    check_model_args(model_args, finetuning_args, stage)
    check_optim_installed(training_args)
    if model_args.quantization_bit is not None and model_args.adapters:
        raise UserError("a quantized policy cannot merge its sft adapter under the PPO adapter; export the sft model "
                        "first (python -m stages.export) and pass it as --model_name_or_path.")
    rollouts = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    if rollouts % ppo_args.num_mini_batches or (ppo_args.whiten_rewards and rollouts // ppo_args.num_mini_batches < 8):
        raise UserError(f"--num_mini_batches {ppo_args.num_mini_batches} must divide per_device_train_batch_size x "
                        f"gradient_accumulation_steps = {rollouts} (into >= 8 rollouts each with --whiten_rewards).")
    unsupported = unsupported_optim(training_args)
    if unsupported:
        optim = getattr(training_args.optim, "value", training_args.optim)
        raise UserError(f"--optim {optim}: ppo checkpoints hold the optimizer state as one whole tensor per parameter, "
                        f"and {unsupported}; use adamw_torch (the default), sgd or rmsprop.")
    reward_args = reward_model_args(ppo_args.reward_model, model_args.trust_remote_code)
    check_model_args(reward_args, finetuning_args, stage)
    training_args.do_train = True  # ppo only trains (no --do_train needed)

    # 2. tokenizer and prompts (a pairwise dataset is refused before anything is written);
    #    left-padded: generation continues right after each prompt
    tokenizer = load_tokenizer(model_args)
    template = get_template(tokenizer, data_args.template)
    encode = partial(prompt_only, tokenizer=tokenizer, template=template, cutoff_len=data_args.cutoff_len)
    dataset_module = get_dataset(data_args, training_args, encode, ranking=False)
    prepare_output_dir(training_args, run_args)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if training_args.resume_from_checkpoint:  # checked before any model is loaded
        check_checkpoint(Path(training_args.resume_from_checkpoint), world_size)
    config = resolved_config("ppo", model_args, data_args, training_args, finetuning_args, ppo_args, run_args)
    save_config(training_args.output_dir, config)
    train_prompts = dataset_module.train_dataset.remove_columns("labels")  # the reference answers are unused
    batch_size = rollouts * world_size
    if len(train_prompts) < batch_size:  # TRL would wait forever for a first whole batch
        raise UserError(f"{len(train_prompts)} training prompts fill no update of {batch_size} (per_device_train_batch_"
                        f"size x gradient_accumulation_steps x {world_size} ranks); add prompts or lower those flags.")
    sample_prompts = (dataset_module.eval_dataset.remove_columns("labels") if dataset_module.eval_dataset is not None
                      else train_prompts.select(range(min(len(train_prompts),
                                                          training_args.per_device_eval_batch_size * world_size))))
    tokenizer.padding_side = "left"

    # 3. models: policy (+ reference), reward, value initialised from the reward model
    set_seed(training_args.seed)
    dtype = get_compute_dtype(training_args.bf16, training_args.fp16)
    # A fresh adapter on top of the merged sft weights: disabling it gives back the sft policy.
    new_adapter = dataclasses.replace(finetuning_args, create_new_adapter=True)
    policy = load_model(tokenizer, model_args, new_adapter, is_trainable=True, compute_dtype=dtype,
                        gradient_checkpointing=training_args.gradient_checkpointing)
    lora = finetuning_args.finetuning_type == "lora"
    reference = None if lora else load_model(tokenizer, model_args, finetuning_args, is_trainable=False,
                                             compute_dtype=dtype)
    value = load_model(tokenizer, reward_args, new_adapter, is_trainable=True, compute_dtype=dtype,
                       gradient_checkpointing=training_args.gradient_checkpointing, add_valuehead=True)
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
    if training_args.gradient_checkpointing:  # TRL's PPO loop never turns it on itself
        for model in (policy, value):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if ppo_args.reward_clip is not None:
        reward.score = torch.nn.Sequential(reward.score, torch.nn.Hardtanh(-ppo_args.reward_clip, ppo_args.reward_clip))

    # 4. trainer: DeepSpeed through the environment, then TRL's config from our arguments
    num_updates = training_args.max_steps if training_args.max_steps > 0 else max(
        1, int(training_args.num_train_epochs * len(train_prompts)) // batch_size)
    if training_args.deepspeed:
        deepspeed_to_accelerate(training_args, policy, num_updates)
    # TRL's PPO trainer builds its Accelerator without the precision flags; they go the same way.
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no"
    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    ppo_config = PPOConfig(
        **{**values, "deepspeed": None}, total_episodes=num_updates * batch_size,
        response_length=ppo_args.max_new_tokens, temperature=ppo_args.temperature, stop_token="eos",
        missing_eos_penalty=ppo_args.missing_eos_penalty, kl_coef=ppo_args.kl_coef,
        kl_estimator=ppo_args.kl_estimator, num_ppo_epochs=ppo_args.ppo_epochs,
        num_mini_batches=ppo_args.num_mini_batches, whiten_rewards=ppo_args.whiten_rewards,
        cliprange=ppo_args.cliprange, cliprange_value=ppo_args.cliprange_value, vf_coef=ppo_args.vf_coef,
        gamma=ppo_args.gamma, lam=ppo_args.lam, num_sample_generations=1 if ppo_args.sample_steps > 0 else 0,
        local_rollout_forward_batch_size=training_args.per_device_train_batch_size)
    init_wandb("ppo", training_args, run_args, config)
    trainer = PolicyTrainer(args=ppo_config, processing_class=tokenizer, model=policy, ref_model=reference,
                            reward_model=reward, value_model=value, train_dataset=train_prompts,
                            eval_dataset=sample_prompts, callbacks=[JsonlLogCallback()], top_k=ppo_args.top_k,
                            top_p=ppo_args.top_p, sample_steps=ppo_args.sample_steps, nan_policy=run_args.nan_policy,
                            resume_from=training_args.resume_from_checkpoint)

    # 5. train, save the policy, record the run. TRL runs a full gc.collect() twice per update;
    # freezing what is alive now (libraries, models, data) leaves it only the update's garbage.
    gc.freeze()
    trainer.train()
    gc.unfreeze()
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


main = main_guard(run_ppo)

if __name__ == "__main__":
    main()
