"""pt: continued pre-training of a causal LM on raw text grouped into fixed-length blocks.

    python -m stages.pt config.yaml [--key value ...]
    deepspeed launch/pt.sh config.yaml [--key value ...]

Evaluation reports loss and perplexity.
"""

from __future__ import annotations

from functools import partial

from .core.errors import main_guard


def run_pt(argv: list[str] | None = None) -> None:
    from transformers import Seq2SeqTrainingArguments, default_data_collator

    from .core.callbacks import JsonlLogCallback, init_wandb
    from .core.stage import add_perplexity, prepare_output_dir, resolved_config, save_config, train_and_save
    from .core.data import get_dataset
    from .core.data.processors import pt_blocks
    from .core.distributed import zero_stage
    from .core.arguments import (DataArguments, FinetuningArguments, ModelArguments, RunArguments, check_optim_installed,
                          parse_args)
    from .core.loader import check_model_args, get_compute_dtype, load_model, load_tokenizer
    from .core.trainers import StageTrainer

    # 1. arguments: file + overrides, validated before anything heavy is loaded
    model_args, data_args, training_args, finetuning_args, run_args = parse_args(
        [ModelArguments, DataArguments, Seq2SeqTrainingArguments, FinetuningArguments, RunArguments], argv, "pt")
    check_model_args(model_args, finetuning_args, zero_stage(training_args.deepspeed))
    check_optim_installed(training_args)
    prepare_output_dir(training_args, run_args)
    config = resolved_config("pt", model_args, data_args, training_args, finetuning_args, run_args)
    save_config(training_args.output_dir, config)

    # 2. tokenizer and data: every text + eos, concatenated, cut into cutoff_len blocks
    tokenizer = load_tokenizer(model_args)
    blocks = partial(pt_blocks, tokenizer=tokenizer, cutoff_len=data_args.cutoff_len)
    dataset_module = get_dataset(data_args, training_args, blocks, ranking=False)

    # 3. model
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=training_args.do_train,
                       compute_dtype=get_compute_dtype(training_args.bf16, training_args.fp16),
                       gradient_checkpointing=training_args.gradient_checkpointing)

    # 4. trainer: blocks are already of equal length, so no padding is needed
    init_wandb("pt", training_args, run_args, config)
    trainer = StageTrainer(model=model, args=training_args, data_collator=default_data_collator,
                           train_dataset=dataset_module.train_dataset, eval_dataset=dataset_module.eval_dataset,
                           processing_class=tokenizer, callbacks=[JsonlLogCallback()], nan_policy=run_args.nan_policy)

    # 5. train, save, evaluate
    if training_args.do_train:
        train_and_save(trainer, training_args, run_args)
    if training_args.do_eval and dataset_module.eval_dataset is not None:
        metrics = add_perplexity(trainer.evaluate(metric_key_prefix="eval"))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


main = main_guard(run_pt)

if __name__ == "__main__":
    main()
