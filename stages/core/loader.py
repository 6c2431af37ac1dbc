"""The one model loader every stage (and DyPRAG) uses: tokenizer + model by keyword flags.

`load_model(tokenizer, model_args, finetuning_args, is_trainable=..., compute_dtype=...)`
handles full / freeze / LoRA tuning, stacking earlier LoRA checkpoints, bitsandbytes 4/8-bit
base weights (QLoRA), the device from LOCAL_RANK, and DeepSpeed ZeRO-3 (no device_map; the
weights are partitioned by transformers' zero.Init when a ZeRO-3 config is active).

Value heads (`add_valuehead=True`, rm and ppo): the model is transformers' one-label
`AutoModelForSequenceClassification` (backbone + linear `score` head, no bias), so an rm output
loads back with plain `AutoModelForSequenceClassification.from_pretrained(out, num_labels=1)` and
is the reward/value model that TRL's PPO trainer expects (it calls the backbone and
`model.score`). With LoRA the head is a trained copy saved inside the adapter (`modules_to_save`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .distributed import local_device
from .errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .arguments import FinetuningArguments, ModelArguments

logger = logging.getLogger(__name__)

VALUE_HEAD = "score"  # the head's name in transformers' *ForSequenceClassification models


def check_model_args(model_args: ModelArguments, finetuning_args: FinetuningArguments, zero_stage: int | None) -> None:
    """Refuse flag combinations that cannot work, before anything is loaded."""
    if model_args.model_name_or_path is None:
        raise UserError("--model_name_or_path is required: a local model directory (or hub id).")
    if model_args.quantization_bit is not None:
        if finetuning_args.finetuning_type != "lora":
            raise UserError(f"--quantization_bit {model_args.quantization_bit} freezes quantized weights, so it needs "
                            f"--finetuning_type lora (got {finetuning_args.finetuning_type}); drop quantization "
                            f"or switch to LoRA.")
        if model_args.quantization_bit == 8 and zero_stage == 3:
            raise UserError("8-bit quantization does not work under DeepSpeed ZeRO-3; use --quantization_bit 4 or a "
                            "ZeRO-2 config (ds_configs/zero2.json).")
        if len(model_args.adapters) > 1:
            raise UserError("a quantized base cannot merge adapters; pass one --adapter_name_or_path, or export the "
                            "merged model first (python -m stages.export) and train on that.")
    path = model_args.model_name_or_path
    if os.path.sep in path or path.startswith("."):
        if not Path(path).is_dir():
            raise UserError(f"--model_name_or_path {path} is not a directory; point it at a saved model.")
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"--model_name_or_path {path} holds no config.json; point it at a saved model "
                            f"(a folder written by save_pretrained).")
        _check_causal_lm(path)
    for adapter in model_args.adapters:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise UserError(f"--adapter_name_or_path {adapter} holds no adapter_config.json; point it at a LoRA "
                            f"adapter folder (an earlier stage's output_dir).")


def _check_causal_lm(path: str) -> None:
    """Refuse a saved model whose config.json names a known architecture without a causal-LM head (e.g. T5, BERT)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        model_type, remote = config.get("model_type"), "AutoModelForCausalLM" in (config.get("auto_map") or {})
    except (OSError, ValueError, AttributeError) as err:  # AttributeError: JSON, but not an object
        raise UserError(f"--model_name_or_path {path}: config.json cannot be read ({err}); point it at a saved "
                        f"model.") from None
    if model_type in CONFIG_MAPPING_NAMES and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        architectures = ", ".join(config.get("architectures") or []) or model_type
        raise UserError(f"--model_name_or_path {path} holds a {model_type} model ({architectures}), not a causal LM; "
                        f"point it at a decoder-only model (e.g. Llama, Qwen) or an earlier stage's output_dir.")


def load_tokenizer(model_args: ModelArguments) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path,
                                                  trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"no tokenizer could be loaded from --model_name_or_path {model_args.model_name_or_path} "
                        f"({str(err).splitlines()[0]}).") from None
    if tokenizer.pad_token_id is None:  # many causal LMs ship without one; eos is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def get_compute_dtype(bf16: bool, fp16: bool) -> torch.dtype:
    import torch

    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def build_quantization_config(quantization_bit: int | None, quantization_type: str, double_quantization: bool,
                              compute_dtype: torch.dtype, zero3: bool = False):
    """bitsandbytes config as a pure function of the flags (None when not quantizing)."""
    if quantization_bit is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantization_type, bnb_4bit_use_double_quant=double_quantization,
        bnb_4bit_compute_dtype=compute_dtype,
        # ZeRO-3 partitions parameters by dtype: store the packed 4-bit weights in the compute dtype.
        bnb_4bit_quant_storage=compute_dtype if zero3 else None,
    )


def find_linear_modules(model: PreTrainedModel, exclude: tuple[str, ...] = ("lm_head", "score")) -> list[str]:
    """Names (last component) of every linear layer that LoRA can target."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and full_name.split(".")[-1] not in exclude:
            names.add(full_name.split(".")[-1])
    return sorted(names)


def _setup_freeze(model: PreTrainedModel, finetuning_args: FinetuningArguments) -> None:
    num_layers = model.config.num_hidden_layers
    count = finetuning_args.freeze_trainable_layers
    layer_ids = range(max(0, num_layers - count), num_layers) if count > 0 else range(min(-count, num_layers))
    modules = finetuning_args.freeze_trainable_modules
    wanted = None if modules == "all" else {m.strip() for m in modules.split(",")}
    for name, param in model.named_parameters():
        parts = name.split(".")
        in_layer = any(f".{i}." in f".{name}." and "layers" in parts for i in layer_ids)
        param.requires_grad_(in_layer and (wanted is None or any(m in parts for m in wanted)))


def has_value_head(folder: str) -> bool:
    """Whether a saved model or LoRA adapter folder (safetensors) holds a value head (`score.weight`)."""
    from safetensors import safe_open

    folder_path = Path(folder)
    index = folder_path / "model.safetensors.index.json"
    if index.is_file():  # a sharded model: the index lists every tensor
        keys = list(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    else:
        keys = []
        for name in ("adapter_model.safetensors", "model.safetensors"):
            if (folder_path / name).is_file():
                with safe_open(str(folder_path / name), framework="pt") as file:
                    keys += list(file.keys())
    return any(key.endswith(f"{VALUE_HEAD}.weight") for key in keys)


def gathered_if_zero3(model):
    """Under ZeRO-3, the model's full parameters for the block (every rank computes the same
    change; rank 0's result is partitioned again on exit); elsewhere nothing."""
    from contextlib import nullcontext

    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0)


def _load_adapters(model, model_args: ModelArguments, finetuning_args: FinetuningArguments, is_trainable: bool,
                   add_valuehead: bool = False):
    from peft import PeftModel

    adapters = model_args.adapters
    resume = adapters[-1] if is_trainable and not finetuning_args.create_new_adapter and adapters else None
    if add_valuehead and resume is not None and not has_value_head(resume):
        resume = None  # an LM adapter (e.g. sft) is merged; the value head then trains in a fresh adapter
    quantized = model_args.quantization_bit is not None
    to_merge = [a for a in adapters if a != resume] if not quantized else []
    for adapter in to_merge:
        with gathered_if_zero3(model):  # merging writes into the base weights: they must be whole
            model = _peft_from_pretrained(PeftModel, model, adapter, is_trainable=False,
                                          generic=add_valuehead and not has_value_head(adapter)).merge_and_unload()
    if resume is not None or (quantized and adapters):
        kept = resume or adapters[-1]
        if add_valuehead and not has_value_head(kept):
            raise UserError(f"adapter {kept} has no value head and a quantized base cannot merge it; export it "
                            f"into the base first (python -m stages.export) and pass that as --model_name_or_path.")
        model = _peft_from_pretrained(PeftModel, model, kept, is_trainable=is_trainable)
    logger.info("adapters: merged %s, kept %s", to_merge or "none", resume or (adapters[-1:] if quantized else "none"))
    return model


def _peft_from_pretrained(peft_model_cls, model, adapter: str, is_trainable: bool, generic: bool = False):
    """Load one adapter; `generic` loads an LM adapter onto a value-head model (task-free PeftModel)."""
    from peft import PeftConfig

    config = None
    if generic:  # PeftModelForCausalLM would need the generation methods a classifier lacks
        config = PeftConfig.from_pretrained(adapter)
        config.task_type = None
    try:
        return peft_model_cls.from_pretrained(model, adapter, is_trainable=is_trainable, config=config)
    except RuntimeError as err:  # a size mismatch means the adapter was trained on another base model
        if "size mismatch" in str(err) or "shape" in str(err):
            base = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
            raise UserError(f"adapter {adapter} does not fit this base model (it was trained on "
                            f"{base or 'another model'}); pass the matching --model_name_or_path.") from None
        raise


def _setup_lora(model, model_args: ModelArguments, finetuning_args: FinetuningArguments, is_trainable: bool,
                add_valuehead: bool = False):
    from peft import LoraConfig, TaskType, get_peft_model

    model = _load_adapters(model, model_args, finetuning_args, is_trainable, add_valuehead)
    if not is_trainable or hasattr(model, "peft_config"):  # inference, or resuming the last adapter
        return model
    targets = finetuning_args.lora_targets
    if targets == ["all"]:
        targets = find_linear_modules(model)
    config = LoraConfig(  # SEQ_CLS trains and saves a copy of the value head (`score`) with the adapter
        task_type=TaskType.SEQ_CLS if add_valuehead else TaskType.CAUSAL_LM, r=finetuning_args.lora_rank,
        lora_alpha=finetuning_args.lora_alpha,
        lora_dropout=finetuning_args.lora_dropout, target_modules=targets,
        modules_to_save=[m.strip() for m in finetuning_args.additional_target.split(",")]
        if finetuning_args.additional_target else None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. "Target modules {...} not found in the base model"
        raise UserError(f"--lora_target {finetuning_args.lora_target}: {str(err).splitlines()[0]}") from None


def _init_value_head(head: torch.nn.Linear, zero3: bool) -> None:
    """A fresh head: normal weights with std 1/sqrt(hidden+1) (lm-human-preferences), set on rank 0.

    Under ZeRO-3 each rank holds a shard of the weight: gather it, let rank 0 write, and the
    context re-partitions rank 0's values to every rank.
    """
    import math
    from contextlib import nullcontext

    import torch

    if zero3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters([head.weight], modifier_rank=0)
    else:
        context = nullcontext()
    with context, torch.no_grad():
        torch.nn.init.normal_(head.weight, std=1 / math.sqrt(head.in_features + 1))


def load_model(tokenizer: PreTrainedTokenizerBase, model_args: ModelArguments,
               finetuning_args: FinetuningArguments, *, is_trainable: bool,
               compute_dtype: torch.dtype | None = None, gradient_checkpointing: bool = False,
               add_valuehead: bool = False) -> Any:
    """Load the causal LM prepared for `finetuning_type` (trainable) or for inference.

    `add_valuehead`: the backbone with a scalar value head instead of the LM head (a one-label
    sequence-classification model). The head comes from the checkpoint or the last adapter that
    holds one; a missing or mismatched head is a `UserError` for inference, and a fresh head
    (initialised under gathered ZeRO-3 parameters) for training.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.integrations import is_deepspeed_zero3_enabled

    compute_dtype = compute_dtype or torch.float32
    # transformers' own switch (from_pretrained partitions under it); deepspeed.comm is up already
    # (distributed.start_deepspeed, from parse_args).
    zero3 = is_deepspeed_zero3_enabled()
    quant_config = build_quantization_config(model_args.quantization_bit, model_args.quantization_type,
                                             model_args.double_quantization, compute_dtype, zero3)
    full = is_trainable and finetuning_args.finetuning_type == "full"
    kwargs: dict[str, Any] = {
        # Trainable weights stay fp32 (the optimizer's master copy); frozen ones use the compute dtype.
        "dtype": torch.float32 if full else compute_dtype,
        "trust_remote_code": model_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
    }
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
        if not zero3:  # bitsandbytes needs placement at load time; ZeRO-3 places weights itself
            kwargs["device_map"] = {"": local_device()}
    path = model_args.model_name_or_path
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_args.trust_remote_code)
        if add_valuehead:
            # One label = the scalar value. The model scores each row at its last non-pad token,
            # so it needs the pad id that our batches are padded with.
            config.num_labels = 1
            config.pad_token_id = tokenizer.pad_token_id
        auto_class = AutoModelForSequenceClassification if add_valuehead else AutoModelForCausalLM
        model, loading_info = auto_class.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    except ValueError as err:  # e.g. "Unrecognized configuration class ... for AutoModelForCausalLM"
        raise UserError(f"--model_name_or_path {path} is not a causal LM that transformers "
                        f"can load ({str(err).splitlines()[0]}).") from None
    except RuntimeError as err:  # transformers refuses a checkpoint tensor of another shape
        if not add_valuehead or "mismatch" not in str(err):
            raise
        raise UserError(f"--model_name_or_path {path} holds a value head of another shape (not one scalar "
                        f"label on hidden size {config.hidden_size}); point it at an rm output or a plain causal "
                        f"LM.") from None
    if add_valuehead and f"{VALUE_HEAD}.weight" in loading_info["missing_keys"]:
        if not any(has_value_head(adapter) for adapter in model_args.adapters):
            if not is_trainable:  # scoring with a random head would look like a model and mean nothing
                raise UserError(f"no value head in --model_name_or_path {path} or --adapter_name_or_path "
                                f"{model_args.adapter_name_or_path}; point them at an rm output (python -m stages.rm).")
            _init_value_head(model.score, zero3)
            logger.info("value head: none in %s, initialised a fresh one", path)

    if not is_trainable:
        if model_args.adapters:
            model = _load_adapters(model, model_args, finetuning_args, is_trainable=False, add_valuehead=add_valuehead)
        model.requires_grad_(False)
        return model.eval()

    if quant_config is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if finetuning_args.finetuning_type == "lora":
        model = _setup_lora(model, model_args, finetuning_args, is_trainable=True, add_valuehead=add_valuehead)
        if gradient_checkpointing:  # checkpointed blocks need an input that requires grad
            model.enable_input_require_grads()
    elif model_args.adapters:  # full/freeze tuning continues from the given adapters merged into the base
        model = _load_adapters(model, model_args, finetuning_args, is_trainable=False, add_valuehead=add_valuehead)
        model.requires_grad_(finetuning_args.finetuning_type == "full")  # peft froze the base while merging
    if finetuning_args.finetuning_type == "freeze":
        _setup_freeze(model, finetuning_args)
        if add_valuehead:  # the head always trains: it is what turns the backbone into a scorer
            model.score.requires_grad_(True)
    for param in model.parameters():  # trainable parameters train in fp32 whatever the base dtype
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    # ZeRO-3 leaves each rank an empty shard in .data; ds_numel is the full size.
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    logger.info("trainable params: %d of %d (%.4f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model


def load_frozen_model(tokenizer: PreTrainedTokenizerBase, model_args: ModelArguments, *, bf16: bool = False,
                      fp16: bool = False, zero3: bool = False) -> PreTrainedModel:
    """The base model of an inference stage or a frozen teacher: adapters merged, no gradients, in the run's compute
    dtype, on this rank's device. bitsandbytes places a quantized model itself, and ZeRO-3's engine its partitions."""
    from .arguments import FinetuningArguments

    model = load_model(tokenizer, model_args, FinetuningArguments(), is_trainable=False,
                       compute_dtype=get_compute_dtype(bf16, fp16))
    if model_args.quantization_bit is None and not zero3:
        model.to(local_device())
    return model
