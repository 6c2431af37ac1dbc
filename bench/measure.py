"""What every benchmark shares: the model preset, this machine's matmul peak, model FLOPs, medians with ranges.

The benchmarks run on the real pretrained embedded model (`--preset smollm2`: SmolLM2-135M-Instruct,
`stages/core/pretrained.py`) by default and on the ~20M random bench model with `--preset bench`.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
REAL_RECORDS = ROOT.parent / "shared" / "data" / "prag_augmented" / "complexwebquestions_llama3.2-1b_46.json"
PRESETS = ("smollm2", "bench")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the --dtypes / --bf16 names
PRESET_HELP = ("model: smollm2 (the real pretrained embedded default, SmolLM2-135M-Instruct) or bench "
               "(a ~20M random Llama, faster)")


def world(work_dir: Path, preset: str) -> Path:
    """`python -m stages.world --preset P` built once into work_dir/P; that folder (model/ and data/)."""
    folder = work_dir / preset
    subprocess.run([sys.executable, "-m", "stages.world", "--output_dir", str(folder), "--preset", preset],
                   check=True, cwd=ROOT, capture_output=True)
    return folder


def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (Linux /proc/cpuinfo flags)."""
    return cpu_kind() in ("AMX", "AVX512-BF16")


def cpu_kind() -> str:
    """The CPU's matmul instruction set, as the README's tables name machines."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX512-BF16" if "avx512_bf16" in flags else "AVX2 only"


def machine_line(threads: int | None = None) -> str:
    """Date, CPU model and flags, torch threads and load: the header every table needs."""
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{datetime.date.today()}, {model} ({cpu_kind()}), {os.cpu_count()} CPUs, "
            f"{threads or torch.get_num_threads()} torch threads{device}, "
            f"1-min load {os.getloadavg()[0]:.1f}, torch {torch.__version__}")


def matmul_peak(dtype: torch.dtype, device: str = "cpu", size: int = 2048, tries: int = 10) -> float:
    """Best matrix-product rate of this machine in `dtype`, FLOP/s, through `F.linear` (x @ W^T).

    F.linear is the kernel nn.Linear runs: with bf16 on a CPU without native bf16 it goes through
    oneDNN (~15 GFLOP/s on an AVX2 box), while a plain `torch.matmul` of two bf16 matrices takes a
    fallback ~10x slower, which would make a "peak" that the model's own layers exceed.
    """
    if device != "cpu":
        size = 8192
    x = torch.randn(size, size, dtype=dtype, device=device)
    weight = torch.randn(size, size, dtype=dtype, device=device)
    torch.nn.functional.linear(x, weight)  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(tries):
        sync(device)
        start = time.perf_counter()
        torch.nn.functional.linear(x, weight)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def sync(device: str | torch.device = "cuda") -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def linear_params(model: torch.nn.Module | Path) -> int:
    """Parameters of the linear layers (lm_head included, tied or not; embedding lookups excluded).

    Model FLOPs per token are multiples of this: 2N forward, 2N for the input gradients, 2N for
    the weight gradients. Attention scores (QK^T, AV) are left out: a few percent at these lengths.
    """
    if isinstance(model, Path):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def spread(values: list[float], digits: int = 2) -> str:
    """'median (min-max)' of the repeats."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def alternate(sides: list, repeat: int) -> list:
    """The run order of one repeat: as given on even repeats, reversed on odd ones (drift hits both ends)."""
    return list(sides) if repeat % 2 == 0 else list(sides)[::-1]


CATEGORIES = (  # (name, substrings of aten op names), first match wins
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "mkldnn")),
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("softmax / cross-entropy", ("softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("optimizer", ("_foreach_", "adam")),
)


def profile(fn, top: int = 12) -> None:
    """Run `fn` under torch.profiler; print each category's share of the self time and the top ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1
    shares = dict.fromkeys([name for name, _ in CATEGORIES] + ["other (elementwise, copies, norms, ...)"], 0.0)
    for event in events:
        name = next((n for n, keys in CATEGORIES if any(k in event.key for k in keys)),
                    "other (elementwise, copies, norms, ...)")
        shares[name] += event.self_cpu_time_total
    print("profile, share of the aten ops' self CPU time: "
          + "; ".join(f"{name} {100 * value / total:.0f} %" for name, value in shares.items()))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
