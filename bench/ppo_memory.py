"""Peak memory of one PPO update: our ppo stage (LoRA, reference = adapter disabled) against TRL's default.

    python bench/ppo_memory.py [--work_dir /tmp/ppo_bench] [--batch_size 8] [--response_length 32] ...

Both sides run one PPO update (generate, score, `--ppo_epochs` optimisation passes) on the same
~20M-parameter model (`python -m stages.world --preset bench`), the same prompts (the first
rows of the embedded demo_sft, tokenized by the project's template), the same reward model (an
rm output with full tuning, one step of `python -m stages.rm`, so plain transformers loads it),
fp32, AdamW, one rank, the same torch thread count, gradient checkpointing on for the trained
models of both sides (TRL's PPOConfig defaults to it, but its PPO loop never switches it on,
so both sides call `gradient_checkpointing_enable()`; `--gradient_checkpointing false` leaves
it off on both).
- ours: `stages.ppo.run_ppo`, the code `python -m stages.ppo` runs: the policy is the base with
  a LoRA adapter (r=8 on every linear layer) and the reference is that model with the adapter
  disabled; the value model is the reward model with its own LoRA adapter and a trainable copy
  of the head, and the reward model is that model with its adapter disabled (one rm backbone).
- TRL default: TRL's own PPO example (`examples/scripts/ppo/ppo.py` without peft): four separate
  models from `from_pretrained` (policy and reference `AutoModelForCausalLM`, reward and value
  `AutoModelForSequenceClassification`), policy and value trained in full.

Each side runs in its own Python process (launched side by side from this script), so
allocator state and imports never mix. Both processes run with glibc's mmap threshold fixed
(MALLOC_MMAP_THRESHOLD_, 128 KiB by default, `--mmap_threshold 0` keeps glibc's default):
otherwise glibc raises the threshold after the first large free and keeps later freed tensors
in its heap, and RSS would measure that allocator policy rather than the memory the update
needs (with glibc's default both sides read higher and the ratio is closer to 1). In each
process a thread samples the resident set size (psutil, every 2 ms) from the start of
`train()` to its end: "step peak" is the largest sample.
"after imports" is the RSS once every library is imported, before any model is loaded; the
"step peak - after imports" column is the memory the models, optimizer and the update itself
take, without the interpreter and libraries that both sides share. "process peak" is
`ru_maxrss` (the whole process, loading included). The ratios are ours / TRL default
(target <= 0.6).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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
    """Wrap a trainer's `train` so the RSS peak of the update is recorded in `result`."""
    result: dict[str, int] = {}

    def wrapped(self, *args, **kwargs):
        sampler = RssSampler()
        sampler.start()
        try:
            return train(self, *args, **kwargs)
        finally:
            result["step_peak"] = sampler.stop()

    return wrapped, result


def common_args(args, out: Path) -> list[str]:
    """Data and run arguments both sides parse the same way."""
    import torch

    work = Path(args.work_dir)
    # bf16 without an accelerator needs TrainingArguments told that it runs on the CPU.
    cpu = ["--use_cpu", "true"] if args.bf16 and not torch.accelerator.is_available() else []
    return [*cpu, "--dataset", "demo_sft", "--dataset_dir", str(work / "embedded" / "data"), "--max_samples",
            str(args.batch_size), "--cutoff_len", str(args.prompt_length), "--output_dir", str(out),
            "--max_steps", "1", "--per_device_train_batch_size", str(args.batch_size), "--report_to", "none",
            "--seed", "42", "--gradient_checkpointing", str(args.gradient_checkpointing), "--bf16", str(args.bf16)]


def side_ours(args) -> dict[str, float]:
    after_imports = rss_after_imports()
    from stages.core import ppo_trainer
    from stages.ppo import run_ppo

    wrapped, result = measured_train(ppo_trainer.PolicyTrainer.train)
    ppo_trainer.PolicyTrainer.train = wrapped
    work = Path(args.work_dir)
    run_ppo(["--model_name_or_path", str(work / "embedded" / "model"), "--reward_model", str(work / "rm"),
             *common_args(args, work / "ours"), "--overwrite_output_dir", "--max_new_tokens", str(args.response_length),
             "--ppo_epochs", str(args.ppo_epochs), "--sample_steps", "0", "--lora_rank", "8"])
    return {"after_imports": after_imports, **result}


def side_trl(args) -> dict[str, float]:
    import dataclasses

    after_imports = rss_after_imports()
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainingArguments
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from stages.core.data import get_dataset
    from stages.core.data.processors import prompt_only
    from stages.core.data.template import get_template
    from stages.core.arguments import DataArguments, parse_args

    work = Path(args.work_dir)
    model_path, rm_path = work / "embedded" / "model", work / "rm"
    # The prompts exactly as our side tokenizes them (the data pipeline is not what is measured).
    data_args, training_args = parse_args([DataArguments, TrainingArguments], common_args(args, work / "trl"), "ppo")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encode = partial(prompt_only, tokenizer=tokenizer, template=get_template(tokenizer, None),
                     cutoff_len=args.prompt_length)
    prompts = get_dataset(data_args, training_args, encode, ranking=False).train_dataset.remove_columns("labels")
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    ref_policy = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1, dtype=torch.float32)
    if args.gradient_checkpointing:  # as our side does: TRL's PPO loop never turns it on itself
        for model in (policy, value):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    # The same TrainingArguments values as our side (fp32, gradient checkpointing as asked), TRL's PPO knobs.
    config = PPOConfig(**{**values, "save_strategy": "no"}, total_episodes=args.batch_size,
                       response_length=args.response_length, temperature=0.7, stop_token="eos",
                       num_ppo_epochs=args.ppo_epochs, num_sample_generations=0,
                       local_rollout_forward_batch_size=args.batch_size)
    wrapped, result = measured_train(PPOTrainer.train)
    PPOTrainer.train = wrapped
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward, value_model=value, train_dataset=prompts, eval_dataset=prompts)
    trainer.train()
    return {"after_imports": after_imports, **result}


def prepare(args) -> None:
    """The bench model and a full-tuned reward model, built once into --work_dir."""
    work = Path(args.work_dir)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    if not (work / "embedded" / "model" / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "stages.world", "--output_dir", str(work / "embedded"),
                        "--preset", "bench"], check=True, cwd=ROOT, env=env)
    if not (work / "rm" / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "stages.rm", "--model_name_or_path", str(work / "embedded" / "model"),
                        "--dataset", "demo_pref", "--dataset_dir", str(work / "embedded" / "data"), "--output_dir",
                        str(work / "rm"), "--overwrite_output_dir", "--do_train", "--max_steps", "1",
                        "--finetuning_type", "full", "--per_device_train_batch_size", "2", "--report_to", "none"],
                       check=True, cwd=ROOT, env=env, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="/tmp/ppo_bench")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per PPO update")
    parser.add_argument("--prompt_length", type=int, default=64, help="prompt tokens at most (cutoff_len)")
    parser.add_argument("--response_length", type=int, default=32, help="generated tokens per prompt")
    parser.add_argument("--ppo_epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side")
    parser.add_argument("--gradient_checkpointing", type=lambda v: v.lower() == "true", default=True,
                        help="true (TRL's PPOConfig default) or false, on both sides")
    parser.add_argument("--bf16", type=lambda v: v.lower() == "true", default=False,
                        help="true: --bf16 on both sides (autocast; ours also keeps frozen weights in bf16)")
    parser.add_argument("--mmap_threshold", type=int, default=131072,
                        help="MALLOC_MMAP_THRESHOLD_ of both sides in bytes (0: glibc's dynamic default)")
    parser.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # one measured process
    args = parser.parse_args()

    if args.side:
        import torch

        torch.set_num_threads(args.threads)
        measured = side_ours(args) if args.side == "ours" else side_trl(args)
        measured["process_peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        print("RESULT " + json.dumps(measured), flush=True)
        return

    prepare(args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled"}
    if args.mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    logs = {side: Path(args.work_dir) / f"{side}.log" for side in ("ours", "trl")}
    procs = {side: subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--side", side], cwd=ROOT, env=env,
                                    stdout=log.open("w"), stderr=subprocess.STDOUT)
             for side, log in logs.items()}
    results = {}
    for side, proc in procs.items():
        proc.wait()
        output = logs[side].read_text()
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.exit(f"side {side} failed ({proc.returncode}), log {logs[side]}:\n{output[-4000:]}")
        results[side] = json.loads(lines[-1][len("RESULT "):])

    mib = 1024 * 1024
    print(f"one PPO update: {args.batch_size} prompts x <= {args.prompt_length} tokens, {args.response_length} "
          f"new tokens, {args.ppo_epochs} PPO epochs, {'bf16' if args.bf16 else 'fp32'}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {args.threads} thread(s) per side, malloc mmap "
          f"threshold {args.mmap_threshold or 'glibc default'}")
    print(f"{'side':<34}{'after imports':>15}{'step peak':>12}{'step - imports':>16}{'process peak':>14}  (MiB)")
    names = {"ours": "ours (LoRA, adapters off)", "trl": "TRL default (4 separate models)"}
    for side, r in results.items():
        print(f"{names[side]:<34}{r['after_imports'] / mib:>15.0f}{r['step_peak'] / mib:>12.0f}"
              f"{(r['step_peak'] - r['after_imports']) / mib:>16.0f}{r['process_peak'] / mib:>14.0f}")
    ours, trl = results["ours"], results["trl"]
    step = {side: r["step_peak"] - r["after_imports"] for side, r in results.items()}
    print(f"ratio ours / TRL default: step peak {ours['step_peak'] / trl['step_peak']:.3f}, "
          f"step - imports {step['ours'] / step['trl']:.3f}, "
          f"process peak {ours['process_peak'] / trl['process_peak']:.3f} (target <= 0.6)")


if __name__ == "__main__":
    main()
