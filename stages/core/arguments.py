"""Typed arguments of every stage and the parser that fills them.

A stage is started as `python -m stages.<name> [config.yaml|config.json] [--key value ...]`:
the file gives the base values, command-line flags override them, and any key that no
argument dataclass declares is an error that names it. Argument names follow the Hugging
Face / LLaMA-Factory conventions; every field of transformers' `TrainingArguments` is
accepted as it is.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from dyprag.padding import IGNORE_INDEX  # noqa: F401 (the stages' name for it)

from .errors import UserError



@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Local model directory (or hub id) of the base causal LM."}
    )
    adapter_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Comma-separated LoRA adapter folders applied in order; the last one resumes training."},
    )
    checkpoint_dir: str | None = field(
        default=None, metadata={"help": "Alias of adapter_name_or_path (older LLaMA-Factory name)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modelling code shipped with the model. Off unless you trust the model."}
    )
    quantization_bit: int | None = field(
        default=None, metadata={"help": "Load the frozen base weights in 4 or 8 bits with bitsandbytes (QLoRA)."}
    )
    quantization_type: Literal["nf4", "fp4"] = field(
        default="nf4", metadata={"help": "4-bit data type: nf4 (normal float) or fp4."}
    )
    double_quantization: bool = field(
        default=True, metadata={"help": "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param)."}
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention kernel: sdpa (default) or eager; flash_attention_2 on GPUs."}
    )
    export_dir: str | None = field(
        default=None, metadata={"help": "export: where the merged model is written."}
    )

    def __post_init__(self) -> None:
        if self.checkpoint_dir and not self.adapter_name_or_path:
            self.adapter_name_or_path = self.checkpoint_dir
        if self.quantization_bit not in (None, 4, 8):
            raise UserError(f"--quantization_bit {self.quantization_bit} is not supported; use 4 or 8.")

    @property
    def adapters(self) -> list[str]:
        return [p.strip() for p in (self.adapter_name_or_path or "").split(",") if p.strip()]


@dataclass
class DataArguments:
    dataset: str | None = field(
        default=None, metadata={"help": "Comma-separated dataset names from dataset_info.json, mixed into one."}
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "Comma-separated evaluation datasets (instead of a val_size split)."}
    )
    dataset_dir: str = field(default="data", metadata={"help": "Folder holding dataset_info.json and the files."})
    template: str | None = field(
        default=None,
        metadata={"help": "Prompt template name (default, alpaca, vicuna, chatml, llama3, empty) or auto: "
                          "the tokenizer's own chat template. None means auto."},
    )
    cutoff_len: int = field(
        default=1024,
        metadata={"help": "Maximum tokens per model row. pt: the texts are joined and cut into blocks of this length "
                          "(a last partial block is dropped); sft, rm: a longer conversation is cut turn by turn (the "
                          "turn that does not fit loses tokens from its prompt and answer in proportion, later turns "
                          "are dropped); ppo and generation prompts keep their last cutoff_len tokens. The log counts "
                          "the rows read, kept and cut."},
    )
    max_samples: int | None = field(default=None, metadata={"help": "Keep at most this many rows per dataset."})
    val_size: float = field(
        default=0.0, metadata={"help": "Held-out evaluation split: a fraction in (0, 1) or a row count (>= 1)."}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the datasets instead of loading them whole."})
    buffer_size: int = field(default=1024, metadata={"help": "Shuffle buffer when streaming."})
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = field(
        default="concat", metadata={"help": "How several datasets are mixed."}
    )
    interleave_probs: str | None = field(
        default=None, metadata={"help": "Comma-separated sampling probabilities for interleave strategies."}
    )
    packing: bool = field(
        default=False,
        metadata={"help": "sft: pack short samples into cutoff_len rows; attention never crosses samples."},
    )
    train_on_prompt: bool = field(default=False, metadata={"help": "sft: also put the loss on prompt tokens."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for datasets.map (None: in process)."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute cached preprocessing."})

    def __post_init__(self) -> None:
        if self.cutoff_len <= 0:
            raise UserError(f"--cutoff_len must be positive, got {self.cutoff_len}.")
        if self.val_size < 0:
            raise UserError(f"--val_size must be >= 0, got {self.val_size}.")
        if self.streaming and 0 < self.val_size < 1:
            raise UserError("--val_size as a fraction needs the dataset length; with --streaming give a row count.")

    @property
    def dataset_names(self) -> list[str]:
        return split_names(self.dataset)

    @property
    def eval_dataset_names(self) -> list[str]:
        return split_names(self.eval_dataset)


@dataclass
class FinetuningArguments:
    finetuning_type: Literal["lora", "freeze", "full"] = field(
        default="lora", metadata={"help": "Which parameters train: LoRA adapters, the last layers, or all."}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (scaling alpha/r); default 2*r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target: str = field(
        default="all",
        metadata={"help": "Comma-separated module names for LoRA (e.g. q_proj,v_proj) or all linear layers."},
    )
    additional_target: str | None = field(
        default=None, metadata={"help": "Comma-separated extra modules trained fully and saved with the adapter."}
    )
    create_new_adapter: bool = field(
        default=False, metadata={"help": "Merge the given adapters and train a fresh one instead of resuming."}
    )
    freeze_trainable_layers: int = field(
        default=2, metadata={"help": "freeze: train the last N layers (negative: the first N)."}
    )
    freeze_trainable_modules: str = field(
        default="all", metadata={"help": "freeze: comma-separated module names inside trainable layers, or all."}
    )

    def __post_init__(self) -> None:
        if self.lora_rank <= 0:
            raise UserError(f"--lora_rank must be a positive integer, got {self.lora_rank}.")
        if self.lora_alpha is None:
            self.lora_alpha = 2 * self.lora_rank
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora_dropout must lie in [0, 1), got {self.lora_dropout}.")

    @property
    def lora_targets(self) -> list[str]:
        return split_names(self.lora_target)


@dataclass
class GeneratingArguments:
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per answer."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy/beam decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    sampling_top_k: int = field(default=50, metadata={"help": "Sample from the k most likely tokens."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width (1: none)."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "Penalty on repeated tokens (1: none)."})

    def to_generate_kwargs(self) -> dict[str, Any]:
        kwargs = asdict(self)
        kwargs["top_k"] = kwargs.pop("sampling_top_k")  # generate()'s name
        if not self.do_sample:  # greedy: drop sampling knobs so generate() does not warn
            for key in ("temperature", "top_k", "top_p"):
                kwargs.pop(key)
        return kwargs


@dataclass
class PPOArguments:
    reward_model: str | None = field(
        default=None,
        metadata={"help": "rm output directory (python -m stages.rm): scores the answers and initialises the value "
                          "model."},
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per answer during rollouts."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the rollouts."})
    sampling_top_k: int = field(
        default=0, metadata={"help": "Rollouts sample from the k most likely tokens (0: all tokens)."}
    )
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
        if self.sampling_top_k < 0 or not 0 < self.top_p <= 1:
            raise UserError(f"--sampling_top_k must be >= 0 and --top_p in (0, 1]; got {self.sampling_top_k} and "
                            f"{self.top_p}.")
        if self.max_new_tokens <= 0 or self.ppo_epochs <= 0 or self.num_mini_batches <= 0:
            raise UserError("--max_new_tokens, --ppo_epochs and --num_mini_batches must be positive.")
        if self.reward_clip is not None and self.reward_clip <= 0:
            raise UserError(f"--reward_clip must be positive, got {self.reward_clip}.")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise UserError(f"--missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}.")



@dataclass
class RunArguments:
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds a run."}
    )
    plot_loss: bool = field(default=False, metadata={"help": "Write loss curves as PNG into output_dir."})
    nan_policy: Literal["stop", "skip"] = field(
        default="stop",
        metadata={"help": "On a NaN/inf training loss, `stop` the run (exit 1; the checkpoints saved so far are kept, "
                          "the final model is not written) or `skip`. pt, sft, rm, ppo, projector: `skip` drops the "
                          "micro-batch (it adds no gradient and is logged as loss 0; `skipped_batches` in the log "
                          "counts them). encode: `stop` keeps the finished shards for --resume_from_checkpoint last; "
                          "`skip` leaves the passage out of the bank (`skipped_passages` in the log and "
                          "encode_summary.json; --resume_from_checkpoint last tries it again)."},
    )
    wandb_group: str | None = field(
        default=None, metadata={"help": "W&B group: give the stages of one pipeline the same group."}
    )
    wandb_job_type: str | None = field(
        default=None, metadata={"help": "W&B job_type (default: the stage name)."}
    )


def split_names(value: str | None) -> list[str]:
    return [name.strip() for name in (value or "").split(",") if name.strip()]


def read_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (the base values of a run)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} does not exist; pass an existing .yaml/.json file or only --key value "
                        f"flags.")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except (ValueError, ImportError, Exception) as err:  # yaml.YAMLError has no common base with ValueError
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"config file {path} could not be parsed ({first_line}); fix its syntax.") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of argument names to values.")
    return values


def check_optim_installed(training_args: Any) -> None:
    """An --optim whose package is missing is refused before anything loads, not by the Trainer once the
    model is loaded (stages whose optimizer the Trainer builds: pt, sft, rm, ppo)."""
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(training_args)
    except (ImportError, ValueError) as err:
        # ValueError: also an optimizer that needs the model to be built (GaLore's target modules); the
        # Trainer checks that one itself when it builds the optimizer.
        if isinstance(err, ImportError) or "install" in str(err):
            optim = getattr(training_args.optim, "value", training_args.optim)
            raise UserError(f"--optim {optim}: {str(err).strip().splitlines()[0]}") from None


# Renamed flags keep working for one release: stage -> {old name: (new name, the value the old flag stands for,
# or None to pass its value on)}. Each use logs one line naming the new flag.
RENAMED_FLAGS: dict[str, dict[str, tuple[str, str | None]]] = {
    # --top_k is the passages per question (augment, prag_eval); the sampling one is spelled apart.
    "ppo": {"top_k": ("sampling_top_k", None)},
    "sft": {"top_k": ("sampling_top_k", None)},
    "encode": {"resume": ("resume_from_checkpoint", "last")},  # the bank continues as a checkpointed run does
    "prag_eval": {"dyprag_combination": ("combination", None)},  # one name with projector_export's
}


def _renamed(argv: list[str], file_values: dict[str, Any], stage: str) -> tuple[list[str], dict[str, Any], list[str]]:
    """argv and config-file values with renamed flags spelled the new way, and one notice per renamed flag used."""
    renamed = RENAMED_FLAGS.get(stage, {})
    notices: list[str] = []

    def new_name(old: str) -> str:
        new, fixed = renamed[old]
        spelled = f"--{new} {fixed}" if fixed is not None else f"--{new}"
        notices.append(f"--{old} is renamed {spelled}; the old name is accepted until the next release.")
        return new

    out: list[str] = []
    skip_value = False
    for position, arg in enumerate(argv):
        if skip_value:
            skip_value = False
            continue
        flag, eq, value = arg.partition("=")
        old = flag[2:] if flag.startswith("--") else None
        if old not in renamed:
            out.append(arg)
            continue
        new, fixed = renamed[old]
        new_name(old)
        if fixed is None:
            out.append(f"--{new}{eq}{value}" if eq else f"--{new}")
            continue
        following = argv[position + 1] if position + 1 < len(argv) else None
        if not eq and following is not None and following.lower() in ("true", "false"):
            value, skip_value = following, True
        if value.lower() != "false":
            out += [f"--{new}", fixed]
    values = dict(file_values)
    for old in [key for key in values if key in renamed]:
        new, fixed = renamed[old]
        value = values.pop(old)
        if fixed is None:
            values[new_name(old)] = value
        elif value not in (False, "false", "False", None):
            values[new_name(old)] = fixed
    return out, values, notices


def parse_args(dataclass_types: list[type], argv: list[str] | None, stage: str) -> tuple[Any, ...]:
    """`parse_stage_args` without the ZeRO stage."""
    return parse_stage_args(dataclass_types, argv, stage)[0]


def parse_stage_args(dataclass_types: list[type], argv: list[str] | None,
                     stage: str) -> tuple[tuple[Any, ...], int | None]:
    """Fill `dataclass_types` from an optional config file plus `--key value` overrides, and set up the process.

    Unknown keys (in the file or on the command line) raise a `UserError` naming them. The process's
    DeepSpeed set-up is decided here, once (`distributed.configure_process`, `start_deepspeed`). Once the
    arguments are valid, logging is set up (`logs.setup_logging`) for the stage that asked.
    Returns the argument objects, in the order of `dataclass_types`, and the ZeRO stage (None without DeepSpeed).
    """
    import sys

    from transformers import HfArgumentParser

    from .distributed import configure_process, start_deepspeed

    class _Parser(HfArgumentParser):
        def error(self, message: str) -> None:  # argparse would print the whole usage and exit 2
            raise UserError(f"{message}. Run `python -m stages.{stage} --help` for the arguments.")

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(dataclass_types, prog=f"python -m stages.{stage}")
    config_file = argv.pop(0) if argv and not argv[0].startswith("-") else None
    file_values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    argv, file_values, notices = _renamed(argv, file_values, stage)
    known = {action.dest for action in parser._actions}
    unknown_in_file = sorted(set(file_values) - known)
    if unknown_in_file:
        raise UserError(f"unknown argument(s) in config file {config_file}: {', '.join(unknown_in_file)}; "
                        f"run `python -m stages.{stage} --help` for the arguments.")
    parser.set_defaults(**file_values)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UserError(f"unknown argument(s): {' '.join(unknown)}; "
                        f"run `python -m stages.{stage} --help` for the arguments.")
    values = vars(namespace)
    zero = configure_process(values, stage)
    outputs = []
    for dtype in dataclass_types:
        names = {f.name for f in fields(dtype) if f.init}
        try:
            outputs.append(dtype(**{k: v for k, v in values.items() if k in names}))
        except UserError:
            raise
        except (ValueError, TypeError) as err:  # TrainingArguments validates in __post_init__
            raise UserError(f"invalid arguments: {str(err).strip().splitlines()[0]}") from None
    if zero is not None:
        start_deepspeed(outputs)
    from .logs import setup_logging

    setup_logging()
    for notice in dict.fromkeys(notices):
        logging.getLogger(__name__).warning(notice)
    return tuple(outputs), zero
