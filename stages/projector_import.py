"""projector_import: a projector released with the original DyPRAG (`epoch_N.pt`) as a stages.projector folder.

    python -m stages.projector_import --original_file epoch_0.pt --model_name_or_path M --output_dir PROJ
    python -m stages.prag_eval --model_name_or_path M --data_file records.json --projector_dir PROJ \\
        --methods vanilla,rag,dyprag,dyprag_combine --output_dir EVAL

M is the base model the checkpoint was trained on (e.g. a local LLaMA-3.2-1B-Instruct folder for
the original's `llama3.2-1b` projector); only its config is read. PROJ then holds our
projector_config.json + projector.safetensors, which compute the same LoRA A and B as the
original for every passage and inject them unscaled as the original does
(`dyprag.original_projector`), so prag_eval, projector_export and further training with
stages.projector take it like a projector of their own. The checkpoint is read as tensors only
(`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .core.dyprag_arguments import ProjectorImportArguments
from .core.errors import UserError, main_guard

logger = logging.getLogger(__name__)

STAGE = "projector_import"


def run_projector_import(argv: list[str] | None = None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dyprag.original_projector import (OriginalCheckpointError, config_for_original, read_original_checkpoint,
                                           projector_from_original)
    from dyprag.projector_model import CONFIG_FILE, save_projector

    from .core.arguments import ModelArguments, parse_args

    model_args, import_args = parse_args([ModelArguments, ProjectorImportArguments], argv, STAGE)
    source, out = Path(import_args.original_file), Path(import_args.output_dir)
    if not model_args.model_name_or_path:
        raise UserError("--model_name_or_path is required: the base model the checkpoint was trained on.")
    if not source.is_file():
        raise UserError(f"--original_file {source} does not exist.")
    if (out / CONFIG_FILE).is_file() and not import_args.overwrite_output_dir:
        raise UserError(f"--output_dir {out} already holds a projector; pick a new folder or add "
                        f"--overwrite_output_dir.")
    try:
        model_config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    except (OSError, ValueError) as err:
        raise UserError(f"--model_name_or_path {model_args.model_name_or_path}: no model config can be read "
                        f"({str(err).splitlines()[0]}).") from None
    with torch.device("meta"):  # the layers' names and shapes only: no weights are read or allocated
        model = AutoModelForCausalLM.from_config(model_config)
    try:
        state = read_original_checkpoint(source)
        config = config_for_original(state, model, base_model_name_or_path=model_args.model_name_or_path)
        projector = projector_from_original(state, config)
    except OriginalCheckpointError as err:
        raise UserError(f"--original_file {err}; pass the epoch_N.pt of a projector trained on "
                        f"--model_name_or_path {model_args.model_name_or_path}.") from None
    save_projector(projector, out)
    logger.info("wrote the projector of %s (%d modules, rank %d, p %d) to %s", source, len(config.modules),
                config.spec.rank, config.projector_p, out)


main = main_guard(run_projector_import)

if __name__ == "__main__":
    main()
