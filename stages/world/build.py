"""Build the demo world into a folder; nothing is downloaded.

    DIR/data/   the demo datasets (stages.world.demo_data) + a LLaMA-Factory `dataset_info.json`
    DIR/model/  loadable with plain `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(DIR/model)`:
                preset smollm2 (default): SmolLM2-135M-Instruct, links to the folder stages.core.pretrained
                converts once per machine; presets tiny / bench: a random Llama-architecture model
                (safetensors) + a byte-level BPE tokenizer trained on the world's own text

Each folder is written into a temporary sibling and moved into place only when complete, with an
`embedded_build.json` naming what it holds: a matching build is reused, a different one is refused
unless `overwrite`. The same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import UserError
from .demo_data import build_datasets, world_texts, write_demo_data
from .facts import generate_world
from .model import PRESETS, build_tiny_model, link_pretrained, train_tokenizer

# Bump when the generated world, datasets, tokenizer or model change for the same arguments:
# an existing output built by another version is then not silently reused.
FORMAT_VERSION = 1
BUILD_INFO = "embedded_build.json"  # written inside data/ and model/; marks a complete build


def check_existing(folder: Path, expected: dict[str, Any], overwrite: bool) -> bool:
    """True when `folder` is a complete build with `expected` settings (reuse it)."""
    if not folder.exists():
        return False
    info_file = folder / BUILD_INFO
    try:
        found = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        found = None
    if found == expected:
        return not overwrite
    if not overwrite:
        what = f"was built with {found}" if found else "is not a build of stages.world"
        raise UserError(f"{folder} {what}, not {expected}; pass --overwrite to rebuild it, "
                        f"or choose another --output_dir.")
    return False


def build_into(final: Path, build: Callable[[Path], object]) -> None:
    """Run `build(tmp_folder)` in a temporary sibling and move it to `final` only when done."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        build(tmp)
        if final.exists():  # --overwrite: move the old build aside first (os.replace needs an empty target)
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)



def build_world(output_dir: Path, preset_name: str, *, seed: int = 0, num_entities: int | None = None,
                overwrite: bool = False) -> None:
    """Write the world of (`seed`, `num_entities`, default the preset's) into `output_dir`/data and /model."""
    preset = PRESETS[preset_name]
    num_entities = preset.num_entities if num_entities is None else num_entities
    world = generate_world(seed, num_entities)  # validates --num_entities before anything is written
    output_dir.mkdir(parents=True, exist_ok=True)
    data_info = {"version": FORMAT_VERSION, "seed": seed, "num_entities": num_entities}
    model_info = {**data_info, "preset": preset_name}
    reuse_data = check_existing(output_dir / "data", data_info, overwrite)
    reuse_model = check_existing(output_dir / "model", model_info, overwrite)

    start = time.time()
    if reuse_data:
        print(f"reusing the existing data in {output_dir / 'data'} (pass --overwrite to rebuild)")
    else:
        def build_data(tmp: Path) -> None:
            write_demo_data(tmp, world)
            (tmp / BUILD_INFO).write_text(json.dumps(data_info, indent=2) + "\n")
        build_into(output_dir / "data", build_data)
        sizes = {name: len(rows) for name, rows in build_datasets(world).items()}
        print(f"wrote {output_dir / 'data'}: {', '.join(f'{k} {v} rows' for k, v in sizes.items())}")
    if reuse_model:
        print(f"reusing the existing model in {output_dir / 'model'} (pass --overwrite to rebuild)")
    else:
        def build_model(tmp: Path) -> None:
            if preset.pretrained:
                from ..core.pretrained import smollm2_folder

                source = smollm2_folder()
                link_pretrained(source, tmp)
                print(f"linked {output_dir / 'model'} to {source}: preset {preset_name}")
            else:
                tokenizer = train_tokenizer(world_texts(world), tmp, vocab_size=preset.vocab_size)
                count = build_tiny_model(tokenizer, tmp, preset.hidden_size, preset.num_layers, preset.num_heads,
                                         preset.intermediate_size, seed=seed)
                print(f"wrote {output_dir / 'model'}: preset {preset_name}, {count:,} parameters, "
                      f"vocab {len(tokenizer)}")
            (tmp / BUILD_INFO).write_text(json.dumps(model_info, indent=2) + "\n")
        build_into(output_dir / "model", build_model)
    print(f"embedded default ready in {output_dir} ({time.time() - start:.1f} s)", flush=True)
