"""rm: a reward model, the backbone with a scalar value head trained on preference pairs.

    python -m stages.rm config.yaml [--key value ...]
    deepspeed launch/rm.sh config.yaml [--key value ...]

Pairwise data in alpaca ranking form (instruction/input + chosen/rejected) or sharegpt ranking
form (conversations + chosen/rejected messages). Loss: -log sigmoid(r_chosen - r_rejected),
with r the head's score at the last real token of prompt + answer. Evaluation reports the
pairwise accuracy (chosen scored above rejected) and the mean margin r_chosen - r_rejected;
`--do_predict` writes both scores per pair to generated_predictions.jsonl.

The output directory is a one-label sequence-classification model: with full/freeze tuning
a plain checkpoint, with LoRA an adapter whose `score` head is saved with it. Either loads with
`AutoModelForSequenceClassification.from_pretrained(output_dir, num_labels=1)` (the adapter
through transformers' PEFT integration, onto the base its adapter_config.json names). An rm
trained on top of other adapters (--adapter_name_or_path) is relative to them; ppo takes it
as `--reward_model` and rebuilds that stack from its run_config.json.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from .core.errors import main_guard


def pairwise_metrics(eval_prediction) -> dict[str, float]:
    """Accuracy (chosen strictly above rejected) and mean margin of (n, 2) score predictions."""
    scores = eval_prediction.predictions
    margin = scores[:, 0] - scores[:, 1]
    return {"accuracy": float((margin > 0).mean()), "margin": float(margin.mean())}


def save_scores(scores, output_dir: str) -> None:
    """generated_predictions.jsonl: the chosen and rejected score of every pair, in dataset order."""
    with open(Path(output_dir) / "generated_predictions.jsonl", "w", encoding="utf-8") as file:
        for chosen, rejected in scores.tolist():
            file.write(json.dumps({"chosen": round(chosen, 6), "rejected": round(rejected, 6)}) + "\n")


def run_rm(argv: list[str] | None = None) -> None:
    from transformers import Seq2SeqTrainingArguments, set_seed

    from .core.arguments import DataArguments, FinetuningArguments, ModelArguments, RunArguments
    from .core.callbacks import JsonlLogCallback
    from .core.data import get_dataset
    from .core.data.collator import PairwiseCollator
    from .core.data.processors import pairwise
    from .core.data.template import get_template
    from .core.errors import UserError
    from .core.loader import get_compute_dtype, load_model, load_tokenizer
    from .core.stage import start_stage, train_and_save
    from .core.trainers import PairwiseTrainer

    # 1. arguments
    (model_args, data_args, training_args, finetuning_args, run_args), run = start_stage(
        "rm", [ModelArguments, DataArguments, Seq2SeqTrainingArguments, FinetuningArguments, RunArguments], argv,
        trainer=True, checkpoints=True)
    training_args.remove_unused_columns = False  # the pairs' columns are not forward() arguments

    # 2. tokenizer, template, pairs (a non-pairwise dataset is refused while loading)
    tokenizer = load_tokenizer(model_args)
    template = get_template(tokenizer, data_args.template)
    encode = partial(pairwise, tokenizer=tokenizer, template=template, cutoff_len=data_args.cutoff_len)
    dataset_module = get_dataset(data_args, training_args, encode, ranking=True)

    # 3. model: backbone + value head (fresh, or the one saved in the checkpoint / a value-head adapter)
    set_seed(training_args.seed)  # the fresh head and LoRA weights are drawn before the Trainer seeds
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=training_args.do_train,
                       compute_dtype=get_compute_dtype(training_args.bf16, training_args.fp16),
                       gradient_checkpointing=training_args.gradient_checkpointing, add_valuehead=True)

    # 4. trainer
    run.start_wandb()
    trainer = PairwiseTrainer(model=model, args=training_args, data_collator=PairwiseCollator(tokenizer.pad_token_id),
                              train_dataset=dataset_module.train_dataset, eval_dataset=dataset_module.eval_dataset,
                              processing_class=tokenizer, compute_metrics=pairwise_metrics,
                              callbacks=[JsonlLogCallback()], nan_policy=run_args.nan_policy)

    # 5. train, save
    if training_args.do_train:
        train_and_save(trainer, training_args, run_args, plot_keys=("loss", "eval_loss", "eval_accuracy"))

    # 6. evaluate (loss, accuracy, margin) and predict (scores per pair)
    evaluation = dataset_module.eval_dataset
    if (training_args.do_eval or training_args.do_predict) and evaluation is None:
        raise UserError("--do_eval/--do_predict need --eval_dataset or --val_size > 0.")
    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if training_args.do_predict:
        result = trainer.predict(evaluation, metric_key_prefix="predict")
        if trainer.is_world_process_zero():
            save_scores(result.predictions, training_args.output_dir)
        trainer.log_metrics("predict", result.metrics)
        trainer.save_metrics("predict", result.metrics)


main = main_guard(run_rm)

if __name__ == "__main__":
    main()
