"""export: merge LoRA adapters into their base and write a plain model directory.

    python -m stages.export --model_name_or_path BASE --adapter_name_or_path OUT --export_dir MERGED

The result loads with `AutoModelForCausalLM.from_pretrained(MERGED)` (an rm adapter: with
`AutoModelForSequenceClassification.from_pretrained(MERGED)`); no peft needed.
"""

from __future__ import annotations

from pathlib import Path

from .core.errors import UserError, main_guard


def run_export(argv: list[str] | None = None) -> None:
    import torch

    from .core.arguments import FinetuningArguments, ModelArguments, RunArguments, parse_args
    from .core.loader import check_model_args, has_value_head, load_model, load_tokenizer

    model_args, finetuning_args, run_args = parse_args([ModelArguments, FinetuningArguments, RunArguments], argv,
                                                       "export")
    check_model_args(model_args, finetuning_args, zero_stage=None)
    if not model_args.export_dir:
        raise UserError("--export_dir is required: the folder the merged model is written to.")
    if model_args.quantization_bit is not None:
        raise UserError("a quantized base cannot be merged; export without --quantization_bit.")
    export_dir = Path(model_args.export_dir)
    if export_dir.is_dir() and any(export_dir.iterdir()) and not run_args.overwrite_output_dir:
        raise UserError(f"--export_dir {export_dir} is not empty; pick a new folder or add --overwrite_output_dir.")

    tokenizer = load_tokenizer(model_args)
    # Merge in fp32 so the exported weights carry the adapter's delta without rounding twice.
    # An rm adapter (value head saved with it) exports as the one-label sequence classifier it is.
    value_head = any(has_value_head(adapter) for adapter in model_args.adapters)
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=False, compute_dtype=torch.float32,
                       add_valuehead=value_head)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(export_dir, safe_serialization=True)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(export_dir)
    print(f"merged model written to {export_dir}")


main = main_guard(run_export)

if __name__ == "__main__":
    main()
