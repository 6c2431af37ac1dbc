"""Data: registry -> raw datasets -> aligned rows -> tokenized model inputs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .loading import ALIGNED_COLUMNS, load_aligned

if TYPE_CHECKING:
    from transformers import Seq2SeqTrainingArguments

    from ..hparams import DataArguments

logger = logging.getLogger(__name__)


@dataclass
class DatasetModule:
    train_dataset: Any = None
    eval_dataset: Any = None


def _tokenize(dataset, processor: Callable, data_args: DataArguments, desc: str, name: str):
    """Run `processor` batched and log how many rows went in and came out."""
    kwargs: dict[str, Any] = {}
    if not data_args.streaming:
        kwargs = {"num_proc": data_args.preprocessing_num_workers,
                  "load_from_cache_file": not data_args.overwrite_cache, "desc": desc}
    before = None if data_args.streaming else len(dataset)
    # A streamed dataset may not know its columns after alignment (column_names is None); the
    # aligned ones must still go, or a processor that changes the row count (pt) fails.
    tokenized = dataset.map(processor, batched=True, batch_size=1000,
                            remove_columns=dataset.column_names or list(ALIGNED_COLUMNS), **kwargs)
    if before is not None:
        after = len(tokenized)
        if after == 0:
            raise UserError(f"{name}: no usable rows are left after preprocessing ({before} read); check the "
                            f"columns, the template and --cutoff_len.")
        # pt groups rows into blocks and packing merges them, so "model rows" is not "rows kept";
        # for plain sft/rm, read - model rows = rows dropped (empty or nothing to learn).
        logger.info("%s: %d rows read -> %d model rows.", name, before, after)
    return tokenized


def get_dataset(data_args: DataArguments, training_args: Seq2SeqTrainingArguments, processor: Callable,
                *, ranking: bool | None = None, eval_processor: Callable | None = None) -> DatasetModule:
    """Load `--dataset` (and `--eval_dataset` or a `--val_size` split) and tokenize with `processor`.

    Runs on the main process first so the other ranks read the cached result.
    """
    if not data_args.dataset_names and not training_args.do_predict:
        raise UserError("--dataset is required: give one or more names from dataset_info.json.")
    eval_processor = eval_processor or processor
    module = DatasetModule()
    with training_args.main_process_first(desc="load and preprocess datasets"):
        seed = training_args.seed
        if data_args.dataset_names:
            train = load_aligned(data_args.dataset_names, data_args, seed, ranking=ranking)
            evaluation = None
            if data_args.val_size > 0 and not data_args.eval_dataset_names:
                if data_args.streaming:
                    size = int(data_args.val_size)
                    evaluation, train = train.take(size), train.skip(size)
                else:
                    size = int(data_args.val_size) if data_args.val_size >= 1 else data_args.val_size
                    split = train.train_test_split(test_size=size, seed=seed)
                    train, evaluation = split["train"], split["test"]
            module.train_dataset = _tokenize(train, processor, data_args, "tokenize train", "train data")
            if evaluation is not None:
                module.eval_dataset = _tokenize(evaluation, eval_processor, data_args, "tokenize eval",
                                                   "validation split")
        if data_args.eval_dataset_names:
            evaluation = load_aligned(data_args.eval_dataset_names, data_args, seed, ranking=ranking)
            module.eval_dataset = _tokenize(evaluation, eval_processor, data_args, "tokenize eval",
                                               "eval data")
    return module
