"""stages.projector_import: a projector checkpoint of the original DyPRAG, converted, gives the original's LoRAs.

`OriginalProjector` below is the original's `src/projector.py` (ParameterTranslator -> Projector
-> ProjectorLoRA -> MLPHypernet), restated with its structure, key names and arithmetic, and its
checkpoint is written the way its train_dyprag.py writes one.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from helpers import run_stage
from torch import nn

from dyprag.lora import inject_lora, select
from dyprag.projector_model import load_projector, passage_hidden, tokenize_passages

KINDS = ["down_proj", "up_proj", "gate_proj"]  # the original's order
RANK, WIDTH = 2, 4


class MLPHypernet(nn.Module):
    def __init__(self, linear1, linear2, input_dim, output_dim):
        super().__init__()
        self.linear1, self.linear2, self.input_dim, self.output_dim = linear1, linear2, input_dim, output_dim

    def forward(self, features):
        return self.linear2(F.relu(self.linear1(features))).reshape(self.input_dim, self.output_dim)


class ProjectorLoRA(nn.Module):
    def __init__(self, module_name, input_dim, lora_rank, output_dim, hidden_dim):
        super().__init__()
        down = module_name == "down_proj"
        self.pre_A_linear = nn.Linear(input_dim + 1, hidden_dim, bias=False)
        self.post_A_linear = nn.Linear(hidden_dim, (output_dim if down else input_dim) * lora_rank, bias=False)
        self.A_hypernet = MLPHypernet(self.pre_A_linear, self.post_A_linear, lora_rank,
                                      output_dim if down else input_dim)
        self.pre_B_linear = nn.Linear(input_dim + 1, hidden_dim, bias=False)
        self.post_B_linear = nn.Linear(hidden_dim, (input_dim if down else output_dim) * lora_rank, bias=False)
        self.B_hypernet = MLPHypernet(self.pre_B_linear, self.post_B_linear, input_dim if down else output_dim,
                                      lora_rank)


class Projector(nn.Module):
    def __init__(self, module_name, layer_idx, input_dim, output_dim, lora_rank, hidden_dim):
        super().__init__()
        self.layer_idx = layer_idx
        self.projector = ProjectorLoRA(module_name, input_dim, lora_rank, output_dim, hidden_dim)

    def forward(self, x):
        index = torch.tensor(self.layer_idx, dtype=torch.float32).view(-1, 1)
        network_input = torch.cat([x, index], dim=1)
        return self.projector.A_hypernet(network_input), self.projector.B_hypernet(network_input)


class OriginalProjector(nn.Module):
    def __init__(self, module_list, layer_idx, input_dim, output_dim, lora_rank, hidden_dim):
        super().__init__()
        self.module_list, self.layer_idx = module_list, layer_idx
        self.projector = nn.ModuleDict({f"{m}_{i}": Projector(m, i, input_dim, output_dim, lora_rank, hidden_dim)
                                        for m in module_list for i in layer_idx})

    def forward(self, x):  # batch 1, as the original
        ret = defaultdict(list)
        for m in self.module_list:
            for i in self.layer_idx:
                lora_a, lora_b = self.projector[f"{m}_{i}"](x)
                ret[f"base_model.model.model.layers.{i}.mlp.{m}.lora_A.weight"] = lora_a
                ret[f"base_model.model.model.layers.{i}.mlp.{m}.lora_B.weight"] = lora_b
        return ret


@pytest.fixture(scope="module")
def original(model):
    """A trained-looking original projector: every weight drawn with std 0.05 (its own init is std 1e-7)."""
    config = model.config
    projector = OriginalProjector(KINDS, list(range(config.num_hidden_layers)), config.hidden_size,
                                    config.intermediate_size, RANK, WIDTH)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in projector.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return projector.eval()


@pytest.fixture(scope="module")
def imported(original, tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("original")
    torch.save({"model_state_dict": original.state_dict()}, folder / "epoch_0.pt")  # train_dyprag.py's save
    run_stage("projector_import", "--original_file", folder / "epoch_0.pt", "--model_name_or_path", tiny_model,
              "--output_dir", folder / "projector")
    return folder / "projector"


PASSAGES = ["Mount Kelvar rises above the river Osna in the north of Dallow.",
            "The lamp of Eddric Vane was first lit in 1723 in the harbour town of Pellam."]


def _original_delta_hooks(model, lora: dict[str, torch.Tensor]) -> list:
    """The original's patched LlamaMLP: each projection's output plus x @ (B @ A)^T, unscaled."""
    handles = []
    for name, module in model.named_modules():
        key = f"base_model.model.{name}.lora_A.weight"
        if key in lora:
            delta = lora[key.replace("lora_A", "lora_B")] @ lora[key]
            handles.append(module.register_forward_hook(lambda mod, args, out, d=delta: out + args[0] @ d.T))
    return handles


def test_imported_projector_gives_the_original_loras_and_deltas(model, original, imported, tiny_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ours = load_projector(imported)
    assert ours.config.spec.scaling == 1.0 and ours.config.pooling == "last"
    assert ours.config.max_passage_length == 3000
    hidden = passage_hidden(model, tokenize_passages(tokenizer, PASSAGES, 3000), tokenizer.pad_token_id)
    generated = ours(hidden)
    assert sorted(generated) == sorted(f"model.layers.{i}.mlp.{m}" for m in KINDS
                                       for i in range(model.config.num_hidden_layers))
    ids = torch.tensor([tokenizer.encode("Where does the river Osna flow?")])
    base = model(input_ids=ids).logits
    for i in range(len(PASSAGES)):
        with torch.no_grad():
            theirs = original(hidden[i:i + 1])
        for name, (lora_a, lora_b) in generated.items():
            torch.testing.assert_close(lora_a[i], theirs[f"base_model.model.{name}.lora_A.weight"])
            torch.testing.assert_close(lora_b[i], theirs[f"base_model.model.{name}.lora_B.weight"])
        handles = _original_delta_hooks(model, theirs)
        try:
            expected = model(input_ids=ids).logits
        finally:
            for handle in handles:
                handle.remove()
        with inject_lora(model, select(generated, i), ours.config.spec.scaling):
            got = model(input_ids=ids).logits
        assert (expected - base).abs().max() > 1e-3  # the LoRA changes the answer's logits ...
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)  # ... exactly as the original's delta


def test_imported_projector_answers_in_prag_eval(imported, tiny_model, demo_data, tmp_path):
    out = tmp_path / "eval"
    run_stage("prag_eval", "--model_name_or_path", tiny_model, "--data_file", demo_data / "demo_qa.json",
              "--max_samples", "3", "--projector_dir", imported, "--methods", "vanilla,dyprag,dyprag_combine",
              "--output_dir", out, "--report_to", "none")
    rows = json.loads((out / "results.json").read_text())["results"]
    assert [(r["method"], r["questions"]) for r in rows] == [("vanilla", 3), ("dyprag", 3), ("dyprag_combine", 3)]


class Opaque:
    """Not a tensor: a checkpoint holding it must not be unpickled."""


@pytest.mark.parametrize("case", ["pickled object", "other model", "not a checkpoint"])
def test_import_refuses_what_is_not_this_models_checkpoint(case, original, model, tiny_model, tmp_path):
    path = tmp_path / "epoch_0.pt"
    if case == "pickled object":
        torch.save({"model_state_dict": original.state_dict(), "extra": Opaque()}, path)
    elif case == "other model":
        other = OriginalProjector(KINDS, [0, 1], model.config.hidden_size + 8, 32, RANK, WIDTH)
        torch.save({"model_state_dict": other.state_dict()}, path)
    else:
        torch.save({"model_state_dict": {"weight": torch.zeros(2)}}, path)
    result = run_stage("projector_import", "--original_file", path, "--model_name_or_path", tiny_model,
                       "--output_dir", tmp_path / "out", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--original_file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
