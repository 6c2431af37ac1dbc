"""dyprag.lora: per-sample LoRA injection by wrapping, against plain peft and against itself."""

from __future__ import annotations

import copy

import pytest
import torch

from dyprag.lora import (LoraDeltaLinear, LoraSpec, combine_sum, inject_lora, module_shapes, read_peft_adapter,
                         save_peft_adapter, select, target_module_names, to_peft_state_dict)

SPEC = LoraSpec()  # r=2, alpha=32, gate/up/down


def random_lora(model, batch: int, seed: int, scale: float = 0.05, spec: LoraSpec = SPEC):
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(batch, spec.rank, i, generator=generator) * scale,
                   torch.randn(batch, o, spec.rank, generator=generator) * scale)
            for name, (i, o) in module_shapes(model, target_module_names(model, spec)).items()}


def tokens(batch: int, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 1000, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, input_ids):
    return model(input_ids=input_ids).logits


def test_targets_every_mlp_projection_in_layer_order(model):
    names = target_module_names(model, SPEC)
    layers = model.config.num_hidden_layers
    assert names == [f"model.layers.{i}.mlp.{m}" for i in range(layers) for m in ("gate_proj", "up_proj", "down_proj")]
    assert SPEC.scaling == 16.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_delta_reproduces_base_logits_exactly(model, dtype):
    model = copy.deepcopy(model).to(dtype)
    ids = tokens(2)
    lora = random_lora(model, 1, seed=1)
    zero = {name: (a, torch.zeros_like(b)) for name, (a, b) in lora.items()}  # B = 0: peft's initial state
    base = logits(model, ids)
    with inject_lora(model, zero, SPEC.scaling):
        injected = logits(model, ids)
    assert injected.dtype == dtype
    assert torch.equal(injected, base)


def test_injection_equals_plain_peft_adapter(model, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    # A peft adapter with random A (peft's init) and random B, loaded the ordinary way.
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=32, lora_dropout=0.0,
                                                                 target_modules=["gate_proj", "up_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    ids = tokens(3)
    expected = logits(loaded, ids)

    weights, spec = read_peft_adapter(tmp_path / "peft")
    assert (spec.rank, spec.alpha) == (2, 32) and len(weights) == len(target_module_names(model, SPEC))
    base = logits(model, ids)
    with inject_lora(model, weights, spec.scaling):
        injected = logits(model, ids)
    assert (expected - base).abs().max() > 1e-2  # the adapter does change the outputs
    torch.testing.assert_close(injected, expected, atol=1e-5, rtol=1e-5)

    # Our own writer produces the same adapter for peft.
    save_peft_adapter(weights, 0, spec, "tiny", tmp_path / "ours")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-6, rtol=1e-6)
    state = to_peft_state_dict(weights, 0)
    assert state["base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"].shape == (2, model.config.hidden_size)


def _qwen2() -> tuple:
    """A tiny random Qwen2 (another architecture: biased attention projections, grouped KV heads), twice."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval().requires_grad_(False)
    return model, copy.deepcopy(model)


def _llama_4bit(tiny_model) -> tuple:
    """The tiny Llama with 4-bit (nf4) base weights, loaded twice (bitsandbytes modules do not deep-copy)."""
    from transformers import AutoModelForCausalLM

    from stages.core.loader import build_quantization_config

    config = build_quantization_config(4, "nf4", True, torch.float32)
    return tuple(AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=config,
                                                      device_map={"": "cpu"}).eval() for _ in range(2))


@pytest.mark.parametrize("architecture", ["qwen2", "llama_4bit"])
def test_injection_equals_plain_peft_on_qwen2_and_on_4bit_weights(architecture, tiny_model, tmp_path):
    from peft import PeftModel

    model, twin = _qwen2() if architecture == "qwen2" else _llama_4bit(tiny_model)
    if architecture == "llama_4bit":
        import bitsandbytes as bnb

        assert isinstance(model.model.layers[0].mlp.gate_proj, bnb.nn.Linear4bit)
    weights = select(random_lora(model, 1, seed=7, scale=0.2), 0)
    save_peft_adapter(weights, 0, SPEC, architecture, tmp_path / "adapter")
    ids = tokens(2, seed=8) % model.config.vocab_size
    expected = logits(PeftModel.from_pretrained(twin, tmp_path / "adapter").eval(), ids)
    base = logits(model, ids)
    with inject_lora(model, weights, SPEC.scaling):
        injected = logits(model, ids)
    assert (expected - base).abs().max() > 1e-2  # the LoRA does change the outputs
    torch.testing.assert_close(injected, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(model, ids), base, atol=0, rtol=0)  # and is gone after the block


def test_per_sample_injection_equals_each_sample_alone(model):
    ids = tokens(3, seed=4)
    lora = random_lora(model, 3, seed=5)
    with inject_lora(model, lora, SPEC.scaling):
        batched = logits(model, ids)
    for i in range(3):
        with inject_lora(model, select(lora, i), SPEC.scaling):
            alone = logits(model, ids[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    assert (batched[0] - batched[1]).abs().max() > 1e-3  # the samples really carry different LoRAs


def test_bf16_delta_runs_in_bf16_and_matches_fp32(model):
    half = copy.deepcopy(model).to(torch.bfloat16)
    name = target_module_names(half, SPEC)[-1]
    lora = random_lora(half, 2, seed=7, scale=0.5)  # fp32 LoRA weights on a bf16 model
    x = torch.randn(2, 5, half.get_submodule(name).in_features, generator=torch.Generator().manual_seed(6))
    lora_a, lora_b = lora[name]
    with torch.no_grad(), inject_lora(half, lora, SPEC.scaling):
        result = half.get_submodule(name)(x.bfloat16())
    base = half.get_submodule(name)(x.bfloat16()).float()
    expected_delta = SPEC.scaling * torch.bmm(torch.bmm(x.bfloat16().float(), lora_a.transpose(1, 2)),
                                              lora_b.transpose(1, 2))
    assert result.dtype == torch.bfloat16
    torch.testing.assert_close(result.float() - base, expected_delta, rtol=0.03, atol=0.03 * expected_delta.abs().max())
    with torch.no_grad(), inject_lora(half, lora, SPEC.scaling):  # and the whole model runs in bf16
        assert logits(half, tokens(2, seed=8)).dtype == torch.bfloat16


def test_model_restored_after_exit_and_after_exception(model):
    ids = tokens(2, seed=8)
    before = logits(model, ids)
    originals = {name: model.get_submodule(name) for name in target_module_names(model, SPEC)}
    lora = random_lora(model, 2, seed=9)
    with inject_lora(model, lora, SPEC.scaling):
        assert all(isinstance(model.get_submodule(n), LoraDeltaLinear) for n in originals)
        assert not torch.equal(logits(model, ids), before)
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert torch.equal(logits(model, ids), before)

    with pytest.raises(RuntimeError, match="boom"):
        with inject_lora(model, lora, SPEC.scaling):
            logits(model, ids)
            raise RuntimeError("boom")
    assert all(model.get_submodule(n) is m for n, m in originals.items())
    assert torch.equal(logits(model, ids), before)

    with pytest.raises(ValueError, match="does not match the input batch"):  # a forward that fails inside
        with inject_lora(model, random_lora(model, 3, seed=10), SPEC.scaling):
            logits(model, ids)
    assert torch.equal(logits(model, ids), before)


def test_combine_sum_equals_sum_of_deltas(model):
    first, second = random_lora(model, 1, seed=11), random_lora(model, 1, seed=12)
    combined = combine_sum([first, second])
    name = target_module_names(model, SPEC)[0]
    assert combined[name][0].shape == (1, 4, model.config.hidden_size)
    for key, (a, b) in combined.items():
        expected = first[key][1][0] @ first[key][0][0] + second[key][1][0] @ second[key][0][0]
        torch.testing.assert_close(b[0] @ a[0], expected)
    ids = tokens(2, seed=13)
    with inject_lora(model, combined, SPEC.scaling):
        together = logits(model, ids)
    with inject_lora(model, first, SPEC.scaling), inject_lora(model, second, SPEC.scaling):  # wrappers stack
        nested = logits(model, ids)
    torch.testing.assert_close(together, nested, atol=1e-5, rtol=1e-5)


def test_bad_weights_are_refused_with_the_module_name(model):
    name = target_module_names(model, SPEC)[0]
    lora = random_lora(model, 1, seed=14)
    wrong = {**lora, name: (lora[name][0][:, :, :-1], lora[name][1])}
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        with inject_lora(model, wrong, SPEC.scaling):
            pass
    with pytest.raises(ValueError, match="does not have"):
        with inject_lora(model, {"model.layers.99.mlp.gate_proj": lora[name]}, SPEC.scaling):
            pass
    assert all(not isinstance(m, LoraDeltaLinear) for m in model.modules())
