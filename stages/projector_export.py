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

import logging
from pathlib import Path

from .core.dyprag_arguments import ProjectorExportArguments
from .core.errors import UserError, main_guard

logger = logging.getLogger(__name__)

STAGE = "projector_export"


def run_projector_export(argv: list[str] | None = None) -> None:
    from dyprag.lora import ADAPTER_CONFIG, LoraSpec, save_peft_adapter, select
    from dyprag.projector_model import (CONFIG_FILE, ProjectorError, ProjectorLoras, check_projector_fits,
                                        combine_loras, load_projector, projector_files)

    from .core.arguments import FinetuningArguments, ModelArguments, parse_args
    from .core.distributed import local_device
    from .core.loader import check_model_args, load_frozen_model, load_tokenizer

    model_args, export_args = parse_args([ModelArguments, ProjectorExportArguments], argv, STAGE)
    folder, out = Path(export_args.projector_dir), Path(export_args.output_dir)
    if not projector_files(folder)[0].is_file():
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
    check_model_args(model_args, FinetuningArguments(), None)

    tokenizer = load_tokenizer(model_args)
    model = load_frozen_model(tokenizer, model_args)
    try:
        check_projector_fits(projector, model)
    except ProjectorError as err:
        raise UserError(f"--model_name_or_path {model_args.model_name_or_path}: {err}") from None
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
