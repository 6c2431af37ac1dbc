"""Data: registry -> raw datasets -> aligned rows -> tokenized model inputs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .loading import ALIGNED_COLUMNS, load_aligned
from .processors import TRUNCATED

if TYPE_CHECKING:
    from transformers import Seq2SeqTrainingArguments

    from ..arguments import DataArguments

logger = logging.getLogger(__name__)


@dataclass
class DatasetModule:
    train_dataset: Any = None
    eval_dataset: Any = None


def _without_counts(processor: Callable, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """`processor` less its truncation counts (a streamed dataset is read lazily: nothing to count up front)."""
    out = processor(batch)
    out.pop(TRUNCATED, None)
    return out


def _tokenize(dataset, processor: Callable, data_args: DataArguments, desc: str, name: str):
    """Run `processor` batched and log how many rows went in, came out and were truncated."""
    kwargs: dict[str, Any] = {}
    if not data_args.streaming:
        kwargs = {"num_proc": data_args.preprocessing_num_workers,
                  "load_from_cache_file": not data_args.overwrite_cache, "desc": desc}
    else:
        processor = partial(_without_counts, processor)
    before = None if data_args.streaming else len(dataset)
    # A streamed dataset may not know its columns after alignment (column_names is None); the
    # aligned ones must still go, or a processor that changes the row count (pt) fails.
    tokenized = dataset.map(processor, batched=True, batch_size=1000,
                            remove_columns=dataset.column_names or list(ALIGNED_COLUMNS), **kwargs)
    if before is not None:
        after = len(tokenized)
        if after == 0:
            raise UserError(f"{name}: no usable rows are left after preprocessing ({before} read): rows without an "
                            f"answer or with nothing to learn are dropped, and pt needs at least --cutoff_len "
                            f"{data_args.cutoff_len} tokens of text; check the data, its columns, the template and "
                            f"--cutoff_len.")
        # pt groups rows into blocks and packing merges them, so "model rows" is not "rows kept";
        # for plain sft/rm, read - model rows = rows dropped (empty or nothing to learn).
        truncated = ""
        if TRUNCATED in tokenized.column_names:
            truncated = f"; {sum(tokenized[TRUNCATED])} cut to --cutoff_len {data_args.cutoff_len}"
            tokenized = tokenized.remove_columns(TRUNCATED)
        logger.info("%s: %d rows read -> %d model rows%s.", name, before, after, truncated)
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
            name = f"--dataset {data_args.dataset}"
            module.train_dataset = _tokenize(train, processor, data_args, "tokenize train", name)
            if evaluation is not None:
                module.eval_dataset = _tokenize(evaluation, eval_processor, data_args, "tokenize eval",
                                                f"the --val_size split of {name}")
        if data_args.eval_dataset_names:
            evaluation = load_aligned(data_args.eval_dataset_names, data_args, seed, ranking=ranking)
            module.eval_dataset = _tokenize(evaluation, eval_processor, data_args, "tokenize eval",
                                            f"--eval_dataset {data_args.eval_dataset}")
    return module
