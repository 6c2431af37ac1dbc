"""Typed arguments of the PRAG / DyPRAG stages: retrieve, augment, encode, projector, prag_eval, projector_export,
projector_import and benchmark. Every field has its `--help`; `__post_init__` refuses what cannot work."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .errors import UserError


# ------------------------------------------------------------------ retrieve

@dataclass
class RetrieveArguments:
    index_dir: str | None = field(default=None, metadata={"help": "Folder of the BM25 index (written with "
                                                                   "--corpus, read otherwise)."})
    corpus: str | None = field(default=None, metadata={"help": "Passage corpus to index: .jsonl (id, title, text) "
                                                               "or .tsv with an id/text/title header (psgs_w100)."})
    input_file: str | None = field(default=None, metadata={"help": "Question records to retrieve for: JSON list, "
                                                                   "JSON lines, or .txt (one question a line)."})
    output_file: str | None = field(default=None, metadata={"help": "Where the records with passages are written "
                                                                    "(JSON list, PRAG format)."})
    top_k: int = field(default=3, metadata={"help": "Passages per question."})
    k1: float = field(default=1.5, metadata={"help": "BM25 term-frequency saturation."})
    b: float = field(default=0.75, metadata={"help": "BM25 length normalisation."})
    mmap: bool = field(default=False, metadata={"help": "Memory-map the index instead of reading it into memory "
                                                        "(Wikipedia-sized corpora)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow replacing an existing index or "
                                                                        "output file."})

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise UserError(f"--top_k must be at least 1, got {self.top_k}.")
        if not self.index_dir:
            raise UserError("--index_dir is required: where the BM25 index is written (with --corpus) or read.")
        if not self.corpus and not self.input_file:
            raise UserError("nothing to do: give --corpus to build an index and/or --input_file to retrieve for.")
        if self.input_file and not self.output_file:
            raise UserError("--input_file needs --output_file: where the records with passages go.")


# ------------------------------------------------------------------ augment

@dataclass
class AugmentArguments:
    input_file: str | None = field(default=None, metadata={"help": "Questions: PRAG records (JSON list / JSON "
                                                                   "lines) or a .txt with one question a line."})
    passages_from: Literal["auto", "records", "retrieval"] = field(
        default="auto", metadata={"help": "Where passages come from: the records' own 'passages', BM25 retrieval, "
                                          "or auto (the records' when they have them, else retrieval)."})
    index_dir: str | None = field(default=None, metadata={"help": "BM25 index built by stages.retrieve."})
    corpus: str | None = field(default=None, metadata={"help": "Passage corpus (.jsonl / .tsv) indexed in memory "
                                                               "when no --index_dir is given."})
    top_k: int = field(default=3, metadata={"help": "Passages augmented per question."})
    candidates: int | None = field(
        default=None, metadata={"help": "Passages tried per question, best first, until --top_k of them parsed (a "
                                        "failure is replaced by the next candidate; the original: 13 for 3). "
                                        "Default: --top_k (no replacement)."})
    num_qa: int = field(default=3, metadata={"help": "QA pairs asked for per passage (the original: 3)."})
    max_attempts: int = field(default=5, metadata={"help": "Times a passage's QA prompt is asked before the "
                                                           "passage is skipped (parse failures retry)."})
    augment_model_name: str | None = field(default=None, metadata={"help": "Prefix of the output fields (default: "
                                                                           "the model path's basename, lower-case)."})
    max_samples: int | None = field(default=None, metadata={"help": "Augment only the first N records."})
    keep_skipped: bool = field(default=False, metadata={"help": "Keep passages whose augmentation never parsed "
                                                                "(without an 'augment' entry: encoding trains them "
                                                                "on the passage alone) instead of dropping them as "
                                                                "the original does."})
    # Generation: the original's sampling (HF's default top-k 50), which is what makes a retry differ.
    max_new_tokens: int = field(default=512, metadata={"help": "Tokens generated per rewrite / QA reply."})
    do_sample: bool = field(default=True, metadata={"help": "Sample the replies (greedy retries would repeat)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})

    def __post_init__(self) -> None:
        if not self.input_file:
            raise UserError("--input_file is required: the questions (PRAG records or a .txt) to augment.")
        for name in ("top_k", "num_qa", "max_attempts", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        self.candidates = self.top_k if self.candidates is None else self.candidates
        if self.candidates < self.top_k:
            raise UserError(f"--candidates ({self.candidates}) must be at least --top_k ({self.top_k}): the passages "
                            f"tried per question include the kept ones.")
        if self.keep_skipped and self.candidates > self.top_k:
            raise UserError("--keep_skipped keeps a failed passage in place, --candidates replaces it by the next "
                            "one; pass one of them.")


# ------------------------------------------------------------------ encode

@dataclass
class EncodeArguments:
    input_file: str | None = field(default=None, metadata={"help": "PRAG records to encode (JSON list / JSON lines), "
                                                                   "e.g. stages.augment's augmented.json."})
    max_samples: int | None = field(default=None, metadata={"help": "Encode only the first N records (the "
                                                                   "original's --sample)."})
    augment_model_name: str | None = field(default=None, metadata={"help": "Prefix of the augmentation fields "
                                                                           "(default: detected from the records)."})
    lora_rank: int = field(default=2, metadata={"help": "LoRA rank r of every passage (the original: 2)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha; the delta is scaled by alpha/r (the original: "
                                                          "32)."})
    lora_target: str = field(default="gate_proj,up_proj,down_proj",
                             metadata={"help": "Comma-separated linear layer names that carry the LoRA, in every "
                                               "layer (the original: the MLP projections)."})
    with_cot: bool = field(default=False, metadata={"help": "Train on full answers with the chain-of-thought prompt "
                                                            "(needs --fewshot_file), as the original's --with_cot."})
    fewshot_file: str | None = field(default=None, metadata={"help": "JSON list of {question, answer} examples for "
                                                                     "the chain-of-thought prompt."})
    cutoff_len: int = field(default=3000, metadata={"help": "Tokens kept per training text: a longer text keeps its "
                                                            "first cutoff_len tokens, and the log counts such texts "
                                                            "(the original: 3000)."})
    passages_per_batch: int = field(default=32, metadata={"help": "Passages whose LoRAs train together in one "
                                                                  "batched forward/backward."})
    max_batch_tokens: int | None = field(
        default=None, metadata={"help": "Padded tokens per forward; a step with more runs as several forwards "
                                        "(memory bound). Default: 16384 on an accelerator, 512 on a CPU."})
    shard_size: int = field(default=256, metadata={"help": "Passages per bank shard file."})

    def __post_init__(self) -> None:
        if not self.input_file:
            raise UserError("--input_file is required: the PRAG records whose passages are encoded.")
        if self.with_cot and not self.fewshot_file:
            raise UserError("--with_cot needs --fewshot_file: a JSON list of {question, answer} examples.")
        if self.max_batch_tokens is None:
            from dyprag.passage_training import default_max_batch_tokens

            from .distributed import local_device

            self.max_batch_tokens = default_max_batch_tokens(local_device())
        for name in ("lora_rank", "lora_alpha", "cutoff_len", "passages_per_batch", "max_batch_tokens", "shard_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")


# ------------------------------------------------------------------ encode


# ------------------------------------------------------------------ projector

@dataclass
class ProjectorArguments:
    data_file: str | None = field(default=None, metadata={"help": "PRAG records whose passages are in the bank (the "
                                                                  "--input_file stages.encode read)."})
    bank_dir: str | None = field(default=None, metadata={"help": "LoRA bank of those passages (stages.encode's "
                                                                 "output_dir): the teachers and MSE targets."})
    split: str | None = field(default=None, metadata={"help": "Train only on records whose 'split' field has this "
                                                              "value (e.g. train for the embedded demo_qa)."})
    max_samples: int | None = field(default=None, metadata={"help": "Use only the first N records (after --split)."})
    augment_model_name: str | None = field(default=None, metadata={"help": "Prefix of the augmentation fields "
                                                                           "(default: detected from the records)."})
    qa_with_passage: bool = field(default=False, metadata={"help": "Put the passage in the QA text's context (the "
                                                                   "original's first PRAG text); default: the "
                                                                   "question alone, as DyPRAG is asked."})
    qa_pairs: Literal["all", "first"] = field(
        default="all", metadata={"help": "QA pairs of a passage's augmentation that become training texts: all, or "
                                         "the first (the original: one text per passage)."})
    with_cot: bool = field(default=False, metadata={"help": "Chain-of-thought QA texts: the few-shot prompt and the "
                                                            "QA's full_answer (needs --fewshot_file), as the original "
                                                            "for 2WikiMultihopQA and HotpotQA."})
    fewshot_file: str | None = field(default=None, metadata={"help": "JSON list of {question, answer} examples for "
                                                                     "the chain-of-thought prompt."})
    objective: Literal["answer", "original"] = field(
        default="answer", metadata={"help": "answer: LM and KL over the answer tokens, each a mean per token, the "
                                            "student's LoRA scaled by alpha/r as the teacher's; original: DyPRAG's "
                                            "train_dyprag.py: LM over every token of the text, KL summed over each "
                                            "text's tokens, the student's LoRA unscaled (B@A, and so at inference). "
                                            "Padding never counts in either."})
    projector_p: int = field(default=32, metadata={"help": "Hidden width p of each (layer, module) MLP (the "
                                                           "original: 32)."})
    pooling: Literal["last", "mean"] = field(default="last", metadata={"help": "Passage state fed to the projector: "
                                                                              "the last token's (the original) or "
                                                                              "the mean over its tokens."})
    max_passage_length: int = field(default=512, metadata={"help": "Passage tokens the frozen model reads (longer "
                                                                   "passages are cut); kept in the projector "
                                                                   "config for inference."})
    cutoff_len: int = field(default=3000, metadata={"help": "Longest QA text in tokens; longer pairs are dropped and "
                                                            "counted (the original: 3000)."})
    kl_weight: float = field(default=0.01, metadata={"help": "Weight of KL(teacher || student) (the original: 0.01)."})
    mse_weight: float = field(default=100.0, metadata={"help": "Weight of the MSE between generated and bank A/B "
                                                               "(the original: 100)."})
    bank_in_memory: bool = field(default=True, metadata={"help": "Copy the training passages' bank LoRAs into RAM "
                                                                 "once; false: gather them per step from the "
                                                                 "memory-mapped bank (for banks larger than RAM)."})

    def __post_init__(self) -> None:
        if not self.data_file:
            raise UserError("--data_file is required: the PRAG records whose passages stages.encode put in the bank.")
        if not self.bank_dir:
            raise UserError("--bank_dir is required: the LoRA bank written by stages.encode.")
        for name in ("projector_p", "max_passage_length", "cutoff_len"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.with_cot and not self.fewshot_file:
            raise UserError("--with_cot needs --fewshot_file: a JSON list of {question, answer} examples whose "
                            "answers end with 'So the answer is ...'.")
        if self.kl_weight < 0 or self.mse_weight < 0:
            raise UserError(f"--kl_weight and --mse_weight must be >= 0, got {self.kl_weight} and {self.mse_weight}.")


# ------------------------------------------------------------------ projector


# ------------------------------------------------------------------ prag_eval

@dataclass
class PragEvalArguments:
    data_file: str | None = field(default=None, metadata={"help": "Question records in the PRAG format (JSON list "
                                                                  "with question, answer, passages)."})
    bank_dir: str | None = field(default=None, metadata={"help": "LoRA bank of the records' passages (from "
                                                                 "stages.encode); needed by prag and prag_combine."})
    projector_dir: str | None = field(default=None, metadata={"help": "Trained parameter projector (the output_dir "
                                                                      "of stages.projector); needed by dyprag and "
                                                                      "dyprag_combine."})
    combination: Literal["factors", "deltas"] = field(
        default="factors", metadata={"help": "How a question's generated LoRAs are combined: factors (average A and B "
                                             "separately, the original) or deltas (average B@A exactly, rank k*r)."})
    methods: str | None = field(default=None,
                                metadata={"help": "Comma-separated methods: vanilla (question only), rag (passages in "
                                                  "context), prag (passage LoRAs), prag_combine (LoRAs + passages), "
                                                  "dyprag (generated LoRAs), dyprag_combine (generated LoRAs + "
                                                  "passages). Default: the first four, plus the dyprag two with "
                                                  "--projector_dir."})
    top_k: int = field(default=3, metadata={"help": "Passages per question (in context and/or as LoRAs)."})
    with_cot: bool = field(default=False, metadata={"help": "Chain-of-thought prompts (needs --fewshot_file); the "
                                                            "answer is read after 'the answer is'."})
    fewshot_file: str | None = field(default=None, metadata={"help": "JSON list of {question, answer} examples for "
                                                                     "the chain-of-thought prompt."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Tokens generated per answer (default: 20 "
                                                                       "direct, 128 chain-of-thought, as the "
                                                                       "original)."})
    split: str | None = field(default=None, metadata={"help": "Keep only records whose 'split' field has this value "
                                                              "(e.g. test for the embedded demo_qa)."})
    max_samples: int | None = field(default=None, metadata={"help": "Answer only the first N records."})

    def __post_init__(self) -> None:
        if not self.data_file:
            raise UserError("--data_file is required: the PRAG records to answer.")
        if self.top_k < 1:
            raise UserError(f"--top_k must be at least 1, got {self.top_k}.")
        if self.with_cot and not self.fewshot_file:
            raise UserError("--with_cot needs --fewshot_file: a JSON list of {question, answer} examples whose "
                            "answers end with 'So the answer is ...'.")
        if self.max_new_tokens is None:
            self.max_new_tokens = 128 if self.with_cot else 20
        if self.methods is None:
            self.methods = "vanilla,rag,prag,prag_combine" + (",dyprag,dyprag_combine" if self.projector_dir else "")
        from dyprag.inference import METHODS

        unknown = [m for m in self.method_names if m not in METHODS]
        if unknown or not self.method_names:
            raise UserError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose from "
                            f"{', '.join(METHODS)}.")
        if any(METHODS[m].lora == "prag" for m in self.method_names) and not self.bank_dir:
            raise UserError("--methods prag/prag_combine need --bank_dir: the LoRA bank written by stages.encode.")
        if any(METHODS[m].lora == "dyprag" for m in self.method_names) and not self.projector_dir:
            raise UserError("--methods dyprag/dyprag_combine need --projector_dir: the projector written by "
                            "stages.projector.")

    @property
    def method_names(self) -> list[str]:
        return [name.strip() for name in self.methods.split(",") if name.strip()]


# ------------------------------------------------------------------ projector_export

@dataclass
class ProjectorExportArguments:
    projector_dir: str | None = field(default=None, metadata={"help": "Trained projector: stages.projector's "
                                                                      "output_dir or one of its checkpoint-N folders."})
    passage: str | None = field(default=None, metadata={"help": "The text of one passage to translate."})
    passages_file: str | None = field(default=None, metadata={"help": "Several passages, combined into one adapter: "
                                                                      "a JSON list of strings, or a .txt file with "
                                                                      "one passage per line."})
    combination: Literal["factors", "deltas"] = field(
        default="factors", metadata={"help": "How several passages' LoRAs are combined: factors (average A and B, "
                                             "rank r, the original) or deltas (average B@A exactly, rank k*r)."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder the peft adapter is written into."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an adapter already in output_dir."})

    def __post_init__(self) -> None:
        if not self.projector_dir:
            raise UserError("--projector_dir is required: the projector written by stages.projector.")
        if (self.passage is None) == (self.passages_file is None):
            raise UserError("give exactly one of --passage (one text) or --passages_file (several, combined).")
        if not self.output_dir:
            raise UserError("--output_dir is required: the folder the peft adapter is written into.")

    def passages(self) -> list[str]:
        if self.passage is not None:
            return [self.passage]
        path = Path(self.passages_file)
        try:
            text = path.read_text(encoding="utf-8")
            texts = ([line.strip() for line in text.splitlines() if line.strip()] if path.suffix == ".txt"
                     else json.loads(text))
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"--passages_file {path} could not be read ({err}).") from None
        if not texts or not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
            raise UserError(f"--passages_file {path} must be a non-empty JSON list of passage strings (or a .txt file, "
                            f"one passage per line).")
        return texts


# ------------------------------------------------------------------ projector_import

@dataclass
class ProjectorImportArguments:
    original_file: str | None = field(default=None, metadata={"help": "The original DyPRAG's projector checkpoint "
                                                                      "(epoch_N.pt from its train_dyprag.py)."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder the projector is written into (the "
                                                                   "--projector_dir of prag_eval)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a projector already in "
                                                                        "output_dir."})

    def __post_init__(self) -> None:
        if not self.original_file:
            raise UserError("--original_file is required: the original DyPRAG's epoch_N.pt.")
        if not self.output_dir:
            raise UserError("--output_dir is required: the folder the projector is written into.")


# ------------------------------------------------------------------ benchmark

@dataclass
class BenchmarkArguments:
    dataset: Literal["2wikimultihopqa", "hotpotqa", "popqa", "complexwebquestions"] | None = field(
        default=None, metadata={"help": "Which benchmark --data_dir holds."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with the benchmark's published files."})
    output_dir: str | None = field(default=None, metadata={"help": "Folder the record files are written into."})
    per_type: int = field(default=300, metadata={"help": "Questions per sub-type file and in total.json (the "
                                                         "original: 300)."})
    skip: int = field(default=0, metadata={"help": "Questions left out at the start of each sub-type and of the "
                                                   "total (the original's projector data: 300)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Write into an output_dir that already "
                                                                        "holds a run's files."})

    def __post_init__(self) -> None:
        for name in ("dataset", "data_dir", "output_dir"):
            if not getattr(self, name):
                raise UserError(f"--{name} is required; run `python -m stages.benchmark --help`.")
        if self.per_type < 1 or self.skip < 0:
            raise UserError(f"--per_type must be at least 1 and --skip at least 0, got {self.per_type} and "
                            f"{self.skip}.")
