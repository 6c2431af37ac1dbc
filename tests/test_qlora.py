"""QLoRA on CPU with bitsandbytes: 4-bit (nf4, double quant) and 8-bit sft steps, and the config builder.

The sft stage runs in this process so the test can hold the very model the Trainer trained:
its base layers must still be bitsandbytes modules with their packed weights untouched, every
LoRA weight must have moved, and the saved adapter, loaded with plain peft onto a freshly
quantized base, must give that trained model's logits.
"""

from __future__ import annotations

import math

import pytest
import torch

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_sft_steps(bits, tiny_model, demo_data, tmp_path, monkeypatch):
    import bitsandbytes as bnb
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import stages.core.loader
    from stages.core.callbacks import read_log
    from stages.core.loader import build_quantization_config
    from stages.sft import run_sft

    held = {}
    load_model = stages.core.loader.load_model

    def load_and_hold(*args, **kwargs):  # run_sft imports load_model from stages.core.loader when it runs
        model = load_model(*args, **kwargs)
        held["model"] = model
        held["before"] = {name: p.detach().clone() for name, p in model.named_parameters()}
        return model

    monkeypatch.setattr(stages.core.loader, "load_model", load_and_hold)
    out = tmp_path / f"qlora{bits}"
    quant_flags = ["--quantization_bit", str(bits)]
    if bits == 4:
        quant_flags += ["--quantization_type", "nf4", "--double_quantization", "true"]
    run_sft(["--model_name_or_path", str(tiny_model), "--dataset", "demo_sft", "--dataset_dir", str(demo_data),
             "--max_samples", "8", "--cutoff_len", "96", "--output_dir", str(out), "--do_train", "--max_steps", "3",
             "--learning_rate", "1e-2", "--per_device_train_batch_size", "4", "--logging_steps", "1",
             "--report_to", "none", *quant_flags])

    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    # The base stayed quantized: every targeted layer wraps a bitsandbytes module.
    model = held["model"]
    quant_class = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    wrapped = {name: module.base_layer for name, module in model.named_modules()
               if name.split(".")[-1] in LORA_MODULES and hasattr(module, "base_layer")}
    assert wrapped and all(isinstance(layer, quant_class) for layer in wrapped.values())
    some_layer = next(iter(wrapped.values()))
    if bits == 4:
        assert some_layer.weight.quant_state.quant_type == "nf4"
        assert some_layer.weight.quant_state.nested  # double quantization
    else:
        assert some_layer.weight.dtype == torch.int8

    # Only LoRA weights trained: all of them moved, every other parameter is bit-identical.
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), held["before"][name])
        assert changed == (name in trainable), name

    # The adapter is saved, LoRA weights only, and reproduces the trained model on a fresh 4/8-bit base.
    adapter = load_file(out / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    batch = tokenizer(["Which country is the city in?", "Who invented the lens?"], return_tensors="pt",
                      padding=True)
    quant_config = build_quantization_config(bits, "nf4", True, torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quant_config, device_map={"": "cpu"})
    reloaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        expected = model.eval()(**batch).logits
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-4)
        with reloaded.disable_adapter():  # and the adapter is not a no-op
            assert (reloaded(**batch).logits - expected).abs().max() > 1e-3


def test_build_quantization_config_is_a_pure_function_of_its_flags():
    from stages.core.loader import build_quantization_config

    assert build_quantization_config(None, "nf4", True, torch.bfloat16) is None

    eight = build_quantization_config(8, "nf4", True, torch.bfloat16)
    assert eight.load_in_8bit and not eight.load_in_4bit

    for quant_type in ("nf4", "fp4"):
        for double in (True, False):
            for dtype in (torch.float32, torch.bfloat16):
                config = build_quantization_config(4, quant_type, double, dtype)
                assert config.load_in_4bit and not config.load_in_8bit
                assert config.bnb_4bit_quant_type == quant_type
                assert config.bnb_4bit_use_double_quant is double
                assert config.bnb_4bit_compute_dtype == dtype
                assert config.bnb_4bit_quant_storage == torch.uint8  # packed bytes outside ZeRO-3
                # ZeRO-3 partitions parameters by dtype, so the packed weights are stored in the compute dtype.
                zero3 = build_quantization_config(4, quant_type, double, dtype, zero3=True)
                assert zero3.bnb_4bit_quant_storage == dtype
                # Same flags, same config; a fresh object each time (no state shared between calls).
                again = build_quantization_config(4, quant_type, double, dtype)
                assert again is not config and again.to_dict() == config.to_dict()
    assert (build_quantization_config(4, "nf4", True, torch.bfloat16).to_dict()
            != build_quantization_config(4, "fp4", True, torch.bfloat16).to_dict())
