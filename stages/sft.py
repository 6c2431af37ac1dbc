"""sft: supervised fine-tuning with the loss on answers only.

    python -m stages.sft config.yaml [--key value ...]
    deepspeed launch/sft.sh config.yaml [--key value ...]

Alpaca and sharegpt data (multi-turn: every assistant turn is learnt, prompts and padding
never), optional packing of short samples with attention kept inside each sample, and
`--predict_with_generate` writing generated_predictions.jsonl with ROUGE-1/2/L and BLEU-4.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from .core.errors import main_guard
from .core.arguments import IGNORE_INDEX


def save_predictions(dataset, predictions, labels, tokenizer, output_dir: str) -> dict[str, float]:
    """Decode, write generated_predictions.jsonl (prompt, predict, label) and score the answers."""
    import numpy as np

    from .core.similarity import similarity_scores

    pad = tokenizer.pad_token_id
    predictions = np.where(predictions != IGNORE_INDEX, predictions, pad)
    labels = np.where(labels != IGNORE_INDEX, labels, pad)
    decoded_preds = tokenizer.batch_decode(predictions, skip_special_tokens=True)
    decoded_labels = tokenizer.batch_decode(labels, skip_special_tokens=True)
    prompts = tokenizer.batch_decode(list(dataset["input_ids"]), skip_special_tokens=True)
    with open(Path(output_dir) / "generated_predictions.jsonl", "w", encoding="utf-8") as file:
        for prompt, prediction, label in zip(prompts, decoded_preds, decoded_labels):
            file.write(json.dumps({"prompt": prompt, "predict": prediction.strip(), "label": label.strip()},
                                  ensure_ascii=False) + "\n")
    return similarity_scores([p.strip() for p in decoded_preds], [label.strip() for label in decoded_labels])


def run_sft(argv: list[str] | None = None) -> None:
    from transformers import Seq2SeqTrainingArguments

    from .core.arguments import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments, RunArguments
    from .core.callbacks import JsonlLogCallback
    from .core.data import get_dataset
    from .core.data.collator import SupervisedCollator
    from .core.data.processors import packed_supervised, prompt_only, supervised
    from .core.data.template import get_template
    from .core.loader import get_compute_dtype, load_model, load_tokenizer
    from .core.stage import add_perplexity, start_stage, train_and_save
    from .core.trainers import SupervisedTrainer

    # 1. arguments
    (model_args, data_args, training_args, finetuning_args, generating_args, run_args), run = start_stage(
        "sft", [ModelArguments, DataArguments, Seq2SeqTrainingArguments, FinetuningArguments, GeneratingArguments,
                RunArguments], argv, trainer=True, checkpoints=True)
    training_args.remove_unused_columns = False  # packed rows carry segment_ids for the collator

    # 2. tokenizer, template, data (answers supervised; generation needs prompts only)
    tokenizer = load_tokenizer(model_args)
    template = get_template(tokenizer, data_args.template)
    encode = partial(packed_supervised if data_args.packing else supervised, tokenizer=tokenizer, template=template,
                     cutoff_len=data_args.cutoff_len, train_on_prompt=data_args.train_on_prompt)
    eval_encode = partial(supervised, tokenizer=tokenizer, template=template, cutoff_len=data_args.cutoff_len,
                          train_on_prompt=data_args.train_on_prompt)
    if training_args.predict_with_generate:
        eval_encode = partial(prompt_only, tokenizer=tokenizer, template=template, cutoff_len=data_args.cutoff_len)
    dataset_module = get_dataset(data_args, training_args, encode, ranking=False, eval_processor=eval_encode)

    # 3. model
    compute_dtype = get_compute_dtype(training_args.bf16, training_args.fp16)
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=training_args.do_train,
                       compute_dtype=compute_dtype, gradient_checkpointing=training_args.gradient_checkpointing)

    # 4. trainer: dynamic padding; packed rows get a block-diagonal mask (boolean for sdpa)
    mask_dtype = None if model_args.attn_implementation == "sdpa" else compute_dtype
    collator = SupervisedCollator(tokenizer.pad_token_id, mask_dtype=mask_dtype)
    run.start_wandb()
    trainer = SupervisedTrainer(model=model, args=training_args, data_collator=collator,
                                train_dataset=dataset_module.train_dataset, eval_dataset=dataset_module.eval_dataset,
                                processing_class=tokenizer, callbacks=[JsonlLogCallback()],
                                nan_policy=run_args.nan_policy)

    # 5. train, save
    if training_args.do_train:
        train_and_save(trainer, training_args, run_args)

    # 6. evaluate (loss/perplexity) and predict (generated answers + similarity)
    evaluation = dataset_module.eval_dataset
    if (training_args.do_eval or training_args.do_predict) and evaluation is None:
        from .core.errors import UserError

        raise UserError("--do_eval/--do_predict need --eval_dataset or --val_size > 0.")
    if training_args.do_eval and not training_args.predict_with_generate:
        metrics = add_perplexity(trainer.evaluate(metric_key_prefix="eval"))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.do_predict or (training_args.do_eval and training_args.predict_with_generate):
        tokenizer.padding_side = "left"  # generation continues right after the prompt
        trainer.data_collator = SupervisedCollator(tokenizer.pad_token_id, left_padding=True)
        gen_kwargs = {**generating_args.to_generate_kwargs(), "eos_token_id": tokenizer.eos_token_id,
                      "pad_token_id": tokenizer.pad_token_id}
        result = trainer.predict(evaluation, metric_key_prefix="predict", **gen_kwargs)
        if trainer.is_world_process_zero():
            metrics = {**result.metrics}
            if training_args.predict_with_generate:
                scores = save_predictions(evaluation, result.predictions, result.label_ids, tokenizer,
                                          training_args.output_dir)
                metrics.update({f"predict_{k}": v for k, v in scores.items()})
            trainer.log_metrics("predict", metrics)
            trainer.save_metrics("predict", metrics)


main = main_guard(run_sft)

if __name__ == "__main__":
    main()
