"""projector_export: the LoRA a trained projector generates for a passage (or a set of them) as a peft adapter.

    python -m stages.projector_export --projector_dir PROJ --passage "Some passage." --output_dir ADAPTER
    python -m stages.projector_export --projector_dir PROJ --passages_file passages.json --output_dir ADAPTER \\
        [--combination factors|deltas] [--model_name_or_path M]

The frozen base model (by default the one the projector was trained with, from its
projector_config.json) reads each passage, the projector turns it into a LoRA, and several
passages are combined as at DyPRAG inference (`dyprag.projector_model.combine_loras`: "factors"
keeps rank r, "deltas" gives rank k*r with the same alpha/r scaling). ADAPTER is a plain peft
folder (adapter_config.json + adapter_model.safetensors):
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(M), ADAPTER)` gives the same
outputs as injecting the generated LoRA.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .core.errors import UserError, main_guard

logger = logging.getLogger(__name__)

STAGE = "projector_export"


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


def run_projector_export(argv: list[str] | None = None) -> None:
    from dyprag.lora import ADAPTER_CONFIG, LoraSpec, save_peft_adapter, select
    from dyprag.projector_model import (CONFIG_FILE, ProjectorConfig, ProjectorError, ProjectorLoras, combine_loras,
                                   load_projector)

    from .core.arguments import FinetuningArguments, ModelArguments, parse_args
    from .core.loader import check_model_args, load_model, load_tokenizer
    from .core.distributed import local_device

    model_args, export_args = parse_args([ModelArguments, ProjectorExportArguments], argv, STAGE)
    folder, out = Path(export_args.projector_dir), Path(export_args.output_dir)
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"--projector_dir {folder} holds no {CONFIG_FILE}; point it at a stages.projector output_dir.")
    if (out / ADAPTER_CONFIG).is_file() and not export_args.overwrite_output_dir:
        raise UserError(f"--output_dir {out} already holds an adapter; pick a new folder or add "
                        f"--overwrite_output_dir.")
    passages = export_args.passages()
    try:
        projector = load_projector(folder, device=local_device())
    except ProjectorError as err:
        raise UserError(f"--projector_dir: {err}") from None
    config = projector.config
    model_args.model_name_or_path = model_args.model_name_or_path or config.base_model_name_or_path
    finetuning_args = FinetuningArguments()
    check_model_args(model_args, finetuning_args, None)

    tokenizer = load_tokenizer(model_args)
    model = load_model(tokenizer, model_args, finetuning_args, is_trainable=False)
    if model_args.quantization_bit is None:
        model.to(local_device())
    if ProjectorConfig.for_model(model, config.spec).modules != config.modules:
        raise UserError(f"--model_name_or_path {model_args.model_name_or_path} does not have the layers the "
                        f"projector was trained for ({config.base_model_name_or_path}).")
    generated = ProjectorLoras(projector, model, tokenizer).generate(passages)
    lora = combine_loras([select(generated, i) for i in range(len(passages))], export_args.combination)
    rank = next(iter(lora.values()))[0].shape[1]
    spec = LoraSpec(rank=rank, alpha=config.spec.alpha * (rank // config.spec.rank),  # the same alpha/r
                    target_modules=config.spec.target_modules)
    save_peft_adapter(lora, 0, spec, model_args.model_name_or_path, out)
    logger.info("wrote the generated LoRA of %d passage(s) (rank %d, %s) to %s", len(passages), rank,
                export_args.combination, out)


main = main_guard(run_projector_export)

if __name__ == "__main__":
    main()
