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

    from .core.callbacks import JsonlLogCallback
    from .core.data import get_dataset
    from .core.data.processors import pt_blocks
    from .core.arguments import DataArguments, FinetuningArguments, ModelArguments, RunArguments
    from .core.loader import get_compute_dtype, load_model, load_tokenizer
    from .core.stage import add_perplexity, start_stage, train_and_save
    from .core.trainers import StageTrainer

    # 1. arguments: file + overrides, validated before anything heavy is loaded
    (model_args, data_args, training_args, finetuning_args, run_args), run = start_stage(
        "pt", [ModelArguments, DataArguments, Seq2SeqTrainingArguments, FinetuningArguments, RunArguments], argv,
        trainer=True, checkpoints=True)

    # 2. tokenizer and data: every text + eos, concatenated, cut into cutoff_len blocks
    tokenizer = load_tokenizer(model_args)
    blocks = partial(pt_blocks, tokenizer=tokenizer, cutoff_len=data_args.cutoff_len)
    dataset_module = get_dataset(data_args, training_args, blocks, ranking=False)

    # 3. model
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=training_args.do_train,
                       compute_dtype=get_compute_dtype(training_args.bf16, training_args.fp16),
                       gradient_checkpointing=training_args.gradient_checkpointing)

    # 4. trainer: blocks are already of equal length, so no padding is needed
    run.start_wandb()
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
