"""Peak memory and speed of one PPO update: our ppo stage against TRL's PPO with peft (its LoRA path).

    python bench/ppo_memory.py [--preset smollm2|bench] [--repeats 3] [--bf16 true] [--response_length 32] ...

Both sides run one PPO update (generate, score, `--ppo_epochs` optimisation passes) on the same
model (the real pretrained SmolLM2-135M-Instruct by default, `--preset bench` the ~20M bench
model), the same prompts (the first rows of the embedded demo_sft, tokenized by the project's
template), the same reward model (an rm output with full tuning, one step of `python -m
stages.rm`, so plain transformers loads it), the same precision (fp32, or with `--bf16 true` bf16
autocast and every frozen weight in bf16 on both sides), AdamW, one rank, the same torch thread
count, LoRA r=8 / alpha 16 on every linear layer of the policy, gradient checkpointing on for the
trained models of both sides (TRL's PPO loop never switches it on itself, so both sides call
`gradient_checkpointing_enable()`; `--gradient_checkpointing false` leaves it off on both).
- ours: `stages.ppo.run_ppo`, the code `python -m stages.ppo` runs: the policy is the base with a
  LoRA adapter and the reference is that model with the adapter disabled; the value model is the
  reward model with its own LoRA adapter and a trainable copy of the head, and the reward model is
  that model with its adapter disabled (one rm backbone).
- TRL with peft: TRL's PPO example (`examples/scripts/ppo/ppo.py`) with `--use_peft`: the policy
  from `from_pretrained` with `peft_config` (TRL wraps it with `get_peft_model`; the reference is
  the policy with its adapter disabled, `ref_model=None`), the reward and value models from
  `from_pretrained` (`AutoModelForSequenceClassification`), the value model trained in full, as that
  path does.

Each run is its own Python process with glibc's default allocator settings, so allocator state
and imports never mix. The sides run one after the other in alternating order, `--repeats` times.
In each process a thread samples the resident set size (psutil, every 2 ms) from the start of
`train()` to its end: "step peak" is the largest sample, and "step s" is the wall time of
`train()` (the whole update: generation, scoring, PPO epochs). "after imports" is the RSS once
every library is imported, before any model is loaded; "step - imports" (step peak minus after
imports) is the memory the models, optimizer and update take, without the interpreter and the
libraries that both sides share. "process peak" is `ru_maxrss` (loading included). Ratios are
ours / TRL, paired per repeat, as median (min-max).

MFU: nominal model FLOPs of the update over step s and the matmul peak of the run's dtype
(measured in this run): per token of prompt + response, 2N each for generation, reference,
reward and value, and 4N per PPO epoch each for policy and value (forward and input gradients;
LoRA's own products and the full value model's weight gradients on TRL's side left out), N = the
linear layers' parameters. Both sides get the same nominal count.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import (PRESET_HELP, PRESETS, ROOT, alternate, linear_params, machine_line,  # noqa: E402
                           matmul_peak, spread, sync, world)

LORA = {"r": 8, "lora_alpha": 16}  # ours: --lora_rank 8 (alpha 2r by default), every linear layer


class RssSampler:
    """Largest resident set size seen between start() and stop(), sampled in a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def start(self) -> None:
        self.peak = self.process.memory_info().rss
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.process.memory_info().rss)


def rss_after_imports() -> int:
    """RSS once both sides' libraries are imported (the same set on both sides), before any model."""
    import psutil
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl.experimental.ppo  # noqa: F401

    import stages.core.data  # noqa: F401
    import stages.ppo  # noqa: F401
    import stages.core.ppo_trainer  # noqa: F401

    return psutil.Process().memory_info().rss


def measured_train(train):
    """Wrap a trainer's `train` so the RSS peak and wall time of the update are recorded in `result`."""
    result: dict[str, float] = {}

    def wrapped(self, *args, **kwargs):
        import torch

        sampler = RssSampler()
        sampler.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            return train(self, *args, **kwargs)
        finally:
            sync()
            result["seconds"] = time.perf_counter() - start
            result["step_peak"] = sampler.stop()
            if torch.cuda.is_available():  # on a GPU the models live there: its allocator's peak is what counts
                result["gpu_peak"] = torch.cuda.max_memory_allocated()

    return wrapped, result


def common_args(args, out: Path) -> list[str]:
    """Data and run arguments both sides parse the same way."""
    import torch

    # bf16 without an accelerator needs TrainingArguments told that it runs on the CPU.
    cpu = ["--use_cpu", "true"] if args.bf16 and not torch.accelerator.is_available() else []
    return [*cpu, "--dataset", "demo_sft", "--dataset_dir", str(args.folder / "data"), "--max_samples",
            str(args.batch_size), "--cutoff_len", str(args.prompt_length), "--output_dir", str(out),
            "--max_steps", "1", "--per_device_train_batch_size", str(args.batch_size), "--report_to", "none",
            "--seed", "42", "--gradient_checkpointing", str(args.gradient_checkpointing), "--bf16", str(args.bf16)]


def load_prompts(args):
    """The prompts exactly as our side tokenizes them (the data pipeline is not what is measured)."""
    from transformers import AutoTokenizer, TrainingArguments

    from stages.core.arguments import DataArguments, parse_args
    from stages.core.data import get_dataset
    from stages.core.data.processors import prompt_only
    from stages.core.data.template import get_template

    data_args, training_args = parse_args([DataArguments, TrainingArguments], common_args(args, args.work_dir / "trl"),
                                          "ppo")
    tokenizer = AutoTokenizer.from_pretrained(args.folder / "model")
    encode = partial(prompt_only, tokenizer=tokenizer, template=get_template(tokenizer, None),
                     cutoff_len=args.prompt_length)
    prompts = get_dataset(data_args, training_args, encode, ranking=False).train_dataset.remove_columns("labels")
    return prompts, tokenizer, training_args


def side_ours(args) -> dict[str, float]:
    after_imports = rss_after_imports()
    from stages.core import ppo_trainer
    from stages.ppo import run_ppo

    wrapped, result = measured_train(ppo_trainer.PolicyTrainer.train)
    ppo_trainer.PolicyTrainer.train = wrapped
    run_ppo(["--model_name_or_path", str(args.folder / "model"), "--reward_model", str(args.reward_dir),
             *common_args(args, args.work_dir / "ours"), "--overwrite_output_dir", "--max_new_tokens",
             str(args.response_length), "--ppo_epochs", str(args.ppo_epochs), "--sample_steps", "0",
             "--lora_rank", str(LORA["r"]), "--lora_alpha", str(LORA["lora_alpha"]), "--temperature", "0.7"])
    return {"after_imports": after_imports, **result}


def side_trl(args) -> dict[str, float]:
    import dataclasses

    after_imports = rss_after_imports()
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainingArguments
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    prompts, tokenizer, training_args = load_prompts(args)
    tokenizer.padding_side = "left"
    # TRL's example loads every model in the run's dtype (its --dtype); the frozen weights match ours.
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model_path, rm_path = args.folder / "model", args.reward_dir
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1, dtype=dtype)
    if args.gradient_checkpointing:  # as our side does: TRL's PPO loop never turns it on itself
        for model in (policy, value):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    # The same TrainingArguments values as our side, TRL's PPO knobs as ours sets them.
    config = PPOConfig(**{**values, "save_strategy": "no"}, total_episodes=args.batch_size,
                       response_length=args.response_length, temperature=0.7, stop_token="eos",
                       num_ppo_epochs=args.ppo_epochs, num_sample_generations=0,
                       local_rollout_forward_batch_size=args.batch_size)
    peft_config = LoraConfig(**LORA, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    wrapped, result = measured_train(PPOTrainer.train)
    PPOTrainer.train = wrapped
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=reward, value_model=value, train_dataset=prompts, eval_dataset=prompts,
                         peft_config=peft_config)
    trainer.train()
    # The prompts' tokens, for the nominal FLOPs of the update (both sides train on the same prompts).
    return {"after_imports": after_imports, **result,
            "prompt_tokens": sum(len(row["input_ids"]) for row in prompts)}


def prepare(args) -> None:
    """The model folder and a full-tuned reward model on it, built once into --work_dir."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    world(args.work_dir, args.preset)
    if not (args.reward_dir / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "stages.rm", "--model_name_or_path", str(args.folder / "model"),
                        "--dataset", "demo_pref", "--dataset_dir", str(args.folder / "data"), "--output_dir",
                        str(args.reward_dir), "--overwrite_output_dir", "--do_train", "--max_steps", "1",
                        "--finetuning_type", "full", "--per_device_train_batch_size", "2", "--report_to", "none"],
                       check=True, cwd=ROOT, env=env, capture_output=True)


def run_side(args, side: str, repeat: int) -> dict[str, float]:
    """One measured process; its RESULT line."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    log = args.work_dir / f"{side}-{repeat}.log"
    with log.open("w") as out:
        code = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--side", side], cwd=ROOT, env=env,
                              stdout=out, stderr=subprocess.STDOUT).returncode
    output = log.read_text()
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    if code != 0 or not lines:
        sys.exit(f"side {side} failed ({code}), log {log}:\n{output[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2", choices=PRESETS, help=PRESET_HELP)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/ppo_bench"),
                        help="model folder and reward model per preset (built on first use), scratch runs")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per PPO update")
    parser.add_argument("--prompt_length", type=int, default=64, help="prompt tokens at most (cutoff_len)")
    parser.add_argument("--response_length", type=int, default=32, help="generated tokens per prompt")
    parser.add_argument("--ppo_epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, in alternating order")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per side (default: torch's)")
    parser.add_argument("--gradient_checkpointing", type=lambda v: v.lower() == "true", default=True,
                        help="true (TRL's PPOConfig default) or false, on both sides")
    parser.add_argument("--bf16", type=lambda v: v.lower() == "true", default=False,
                        help="true: bf16 autocast and frozen weights in bf16 on both sides")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # one measured process
    args = parser.parse_args()
    args.folder, args.reward_dir = args.work_dir / args.preset, args.work_dir / f"rm-{args.preset}"

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side:
        measured = side_ours(args) if args.side == "ours" else side_trl(args)
        measured["process_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        print("RESULT " + json.dumps(measured), flush=True)
        return

    args.work_dir.mkdir(parents=True, exist_ok=True)
    prepare(args)
    header = machine_line(args.threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = matmul_peak(dtype, device)
    results: dict[str, list[dict[str, float]]] = {"ours": [], "trl": []}
    for repeat in range(args.repeats):
        for side in alternate(["ours", "trl"], repeat):
            results[side].append(run_side(args, side, repeat))
            r = results[side][-1]
            print(f"  repeat {repeat + 1}: {side:4s} step peak {r['step_peak'] / 2**20:6.0f} MiB, "
                  f"{r['seconds']:6.1f} s", flush=True)
    peak = max(peak, matmul_peak(dtype, device))
    tokens = results["trl"][0]["prompt_tokens"] + args.batch_size * args.response_length
    flops = tokens * linear_params(args.folder / "model") * (8 + 8 * args.ppo_epochs)

    mib = 2**20
    print(f"\n{header}\none PPO update: {args.batch_size} prompts x <= {args.prompt_length} tokens, "
          f"{args.response_length} new tokens, {args.ppo_epochs} PPO epochs, {'bf16' if args.bf16 else 'fp32'}, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, glibc's default malloc, "
          f"{args.repeats} repeats; model {(args.folder / 'model').resolve()}; matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s ({'bf16' if args.bf16 else 'fp32'})")
    columns = ("after_imports", "step_peak", "step", "process_peak", *(["gpu_peak"] if torch.cuda.is_available()
                                                                       else []))
    for r in results["ours"] + results["trl"]:
        r["step"] = r["step_peak"] - r["after_imports"]
    titles = {"after_imports": "after imports", "step_peak": "step peak", "step": "step - imports",
              "process_peak": "process peak", "gpu_peak": "GPU peak"}
    print(f"{'side (MiB; median (min-max))':34}{''.join(f'{titles[c]:>20}' for c in columns)}{'step s':>20}"
          f"{'MFU%':>6}")
    names = {"ours": "ours (LoRA, adapters off)", "trl": "TRL with peft (value in full)"}
    for side, runs in results.items():
        cells = "".join(f"{spread([r[c] / mib for r in runs], 0):>20}" for c in columns)
        seconds = [r["seconds"] for r in runs]
        print(f"{names[side]:34}{cells}{spread(seconds, 1):>20}{100 * flops / statistics.median(seconds) / peak:6.1f}")
    ratio = {c: spread([o[c] / t[c] for o, t in zip(results["ours"], results["trl"])]) for c in columns}
    speed = spread([t["seconds"] / o["seconds"] for o, t in zip(results["ours"], results["trl"])])
    gpu = f", GPU peak {ratio['gpu_peak']}" if "gpu_peak" in ratio else ""
    print(f"ratio ours / TRL with peft: step peak {ratio['step_peak']}, step - imports {ratio['step']}, process "
          f"peak {ratio['process_peak']}{gpu}; speed (TRL s / ours s) {speed} "
          "(goals: step peak <= 0.8x at >= 1.0x speed)")


if __name__ == "__main__":
    main()
