"""The DeepSpeed set-up of a process, decided once (`configure_process`, `start_deepspeed`), and the
whole tensors of a ZeRO-partitioned training run (checkpoints)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError


def read_ds_config(config: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """The `--deepspeed` value as a dict: a JSON file path or an already parsed dict."""
    if config is None or isinstance(config, dict):
        return config
    path = Path(config)
    if not path.is_file():
        raise UserError(f"--deepspeed {config} does not exist; use one of ds_configs/*.json.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"--deepspeed {config} is not valid JSON (line {err.lineno}: {err.msg}).") from None


def zero_stage(config: str | dict[str, Any] | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config, or None without DeepSpeed."""
    values = read_ds_config(config)
    if values is None:
        return None
    stage = values.get("zero_optimization", {}).get("stage", 0) if isinstance(values, dict) else None
    if stage not in (0, 1, 2, 3):
        raise UserError(f"--deepspeed {config}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}; fix the "
                        f"config or use one of ds_configs/*.json.")
    return stage


def local_device() -> Any:
    """This process's device: accelerator number LOCAL_RANK, or the CPU."""
    import torch

    if torch.accelerator.is_available():
        return torch.device(torch.accelerator.current_accelerator().type, int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_single_process_env() -> None:
    """Make a process started without a launcher a world of one for `deepspeed.initialize`.

    Stages that build their DeepSpeed engine themselves also run as plain `python -m ...`;
    without the launcher's RANK/WORLD_SIZE/MASTER_* DeepSpeed would try MPI discovery. A run
    under a launcher (RANK set) is left alone.
    """
    import socket

    if "RANK" in os.environ:
        return
    with socket.socket() as sock:  # a free port for the one-member process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", str(port))})
    # accelerate, seeing a distributed CPU run, would set this to the core count itself and warn.
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))


# Stages whose HF/TRL trainer builds a DeepSpeed optimizer from the run's config (fp16 needs ZeRO there).
TRAINER_STAGES = ("pt", "sft", "rm", "ppo")


def _cpu_has_fp16() -> bool:
    """Whether DeepSpeed runs fp16 on this machine's CPU ranks (its CPU accelerator asks oneDNN: AVX512-FP16 or
    AMX-FP16 CPUs have it); the engine refuses fp16 otherwise."""
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


def configure_process(values: dict[str, Any], stage: str) -> int | None:
    """The per-process DeepSpeed decisions taken before the argument dataclasses are built (`parse_args`).

    `values` are the parsed flags (`use_cpu` is set in them). Returns the ZeRO stage of `--deepspeed`,
    read here once for the process (None without DeepSpeed); a config DeepSpeed would refuse, or fp16
    where it would not train, is a UserError.
    """
    config = values.get("deepspeed")
    if not config:
        return None
    zero = zero_stage(config)
    # `python -m stages.X --deepspeed cfg.json` without the launcher: a world of one, instead of
    # DeepSpeed's MPI discovery failing with an mpi4py traceback.
    init_single_process_env()
    if not values.get("use_cpu"):
        import torch

        # Without an accelerator, accelerate only counts the DeepSpeed ranks (gloo) when told
        # it runs on the CPU; otherwise every rank believes it is alone and sees all the data.
        values["use_cpu"] = not torch.accelerator.is_available()
    if values.get("fp16") and stage in TRAINER_STAGES and zero == 0:
        raise UserError(f"--fp16 with --deepspeed {config} (ZeRO stage 0) would not train: without ZeRO, "
                        f"deepspeed < 0.20 does not scale the loss for its fp16 optimizer yet divides the gradients "
                        f"by the loss scale (65536 at first), so every update is that much too small (DeepSpeed PR "
                        f"#8393); use a ZeRO-1/2/3 config (ds_configs/zero2.json) or --bf16 true.")
    if values.get("use_cpu") and values.get("fp16") and not _cpu_has_fp16():
        raise UserError("--fp16 under --deepspeed needs a GPU or a CPU with fp16 support (DeepSpeed refuses fp16 on "
                        "these CPU ranks); use --bf16 true or leave both off (fp32).")
    return zero


def start_deepspeed(arg_objects: Any) -> None:
    """The per-process DeepSpeed set-up once the argument dataclasses exist (`parse_args`, with `--deepspeed`):
    round-robin gradients off in the config the HF Trainer builds its engine from, `deepspeed.comm` up."""
    for args in arg_objects:
        ds_config = getattr(args, "hf_deepspeed_config", None)
        if ds_config is not None:
            without_round_robin_gradients(ds_config.config)  # our checkpoints gather ZeRO partitions
    init_deepspeed_comm()


def accelerate_env(training_args: Any, model: Any, num_updates: int) -> None:
    """Give the Accelerator that TRL's PPO trainer builds the run's precision and DeepSpeed config, through
    the environment (it takes neither from its config).

    TRL's PPOConfig cannot take `deepspeed=` under the launcher (its `world_size` field shadows
    TrainingArguments.world_size, which the config resolution reads). Our TrainingArguments
    resolved the "auto" batch sizes, clipping and precision already; the model-size "auto"
    values are filled here, and the concrete config is written to output_dir for every rank.
    """
    precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no"
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision
    if not training_args.deepspeed:
        return
    ds_config = training_args.hf_deepspeed_config
    ds_config.trainer_config_finalize(training_args, model, num_updates)
    without_round_robin_gradients(ds_config.config)  # checkpoints gather whole tensors
    if "optimizer" in ds_config.config or "scheduler" in ds_config.config:
        raise UserError(f"--deepspeed {training_args.deepspeed}: ppo builds its own optimizer and scheduler; remove "
                        f"the optimizer/scheduler sections (or use ds_configs/*.json).")
    path = Path(training_args.output_dir) / "deepspeed_config.json"
    partial_path = path.with_name(f".{path.name}.rank{os.environ.get('RANK', '0')}")
    partial_path.write_text(json.dumps(ds_config.config, indent=2), encoding="utf-8")
    partial_path.replace(path)  # atomic: ranks write identical content, none reads a partial file
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(path.resolve())


# ------------------------------------------------- whole tensors of a (ZeRO-partitioned) training run
# Checkpoints of the stages that drive DeepSpeed (or torch) themselves hold whole tensors by
# parameter name, so a run resumes on any number of ranks and nothing is pickled. The optimizer
# state saved is every per-element tensor it keeps for a parameter (Adam's exp_avg/exp_avg_sq,
# RMSprop's square_avg, SGD's momentum_buffer, ...) plus its step count.


def init_deepspeed_comm() -> None:
    """Set up `deepspeed.comm` (over the process group accelerate made, if any) once per process.

    On CPU ranks of one machine DeepSpeed maps a 69 MB shared-memory allreduce buffer per rank
    under /dev/shm and never unlinks it: every run would leave 69 MB of RAM per rank behind
    until reboot. Once every rank has mapped its peers' buffers (the barrier), each rank
    unlinks its own name; the mappings live on until the process exits, however it exits.
    """
    import deepspeed

    if deepspeed.comm.is_initialized():
        return
    # zero.Init and the engine take the world from deepspeed.comm; on CPU ranks accelerate set up
    # the gloo group without telling DeepSpeed, so wrap that group now (else a world of one).
    deepspeed.init_distributed()
    if getattr(deepspeed.comm.comm.cdb, "shm_comm_op", None) is None:
        return
    deepspeed.comm.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{deepspeed.comm.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def without_round_robin_gradients(config: dict[str, Any]) -> None:
    """Turn off ZeRO's round-robin gradient partitioning in a DeepSpeed config (in place).

    deepspeed 0.19.8: with it, safe_get/set_full_fp32_param and safe_get/set_full_optimizer_state
    address the wrong slices (two ranks, checked against ZeRO-0: training is right, the gathered
    tensors are not), and the checkpoints here are built with them. The reordering only balances
    offloaded gradient copies.
    """
    config.get("zero_optimization", {})["round_robin_gradients"] = False


def _torch_optimizer(optimizer: Any) -> Any:
    # accelerate's AcceleratedOptimizer and ZeRO's wrapper keep the optimizer they wrap as .optimizer;
    # the innermost is the torch optimizer (over ZeRO's flat fp32 partitions, or the parameters).
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _wrapper_with(optimizer: Any, attribute: str) -> Any:
    # The optimizer in the wrapper chain (accelerate -> ZeRO -> torch) that has `attribute`, or None.
    while optimizer is not None and not hasattr(optimizer, attribute):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def _is_partitioned(param: Any) -> bool:
    # ZeRO-1/2 link each parameter to its slice of a flat fp32 master (_hp_mapping; None on ranks without
    # one); ZeRO-3 parameters carry a ds_id.
    return hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")


def _trained(module: Any) -> list[tuple[str, Any]]:
    return [(name, param) for name, param in module.named_parameters() if param.requires_grad]


def _masters(optimizer: Any) -> dict[int, tuple[Any, int | None]]:
    """By id of each trained parameter without ZeRO: the fp32 tensor the torch optimizer steps for it (its
    state is keyed by that tensor) and the parameter's offset in it (None: the tensor is the parameter's own).

    DeepSpeed's bf16/fp16 optimizers without ZeRO keep fp32 masters: FP16_UnfusedOptimizer one copy per
    parameter, FP16_Optimizer (the wrapper of FusedAdam, a DeepSpeed config's "optimizer") one flat tensor
    per group, the parameters laid end to end in group order. Every other optimizer steps the parameters
    themselves: {}.
    """
    fused = _wrapper_with(optimizer, "fp32_groups_flat")
    if fused is not None:
        masters: dict[int, tuple[Any, int | None]] = {}
        for params, flat in zip(fused.fp16_groups, fused.fp32_groups_flat):
            offset = 0
            for param in params:
                masters[id(param)] = (flat, offset)
                offset += param.numel()
        return masters
    unfused = _wrapper_with(optimizer, "fp32_groups")
    if unfused is None:
        return {}
    return {id(low): (high, None) for lows, highs in zip(unfused.fp16_groups, unfused.fp32_groups)
            for low, high in zip(lows, highs)}


def _part(tensor: Any, offset: int | None, param: Any) -> Any:
    # The parameter's part of a master-shaped tensor (a view: writing to it writes the master's state).
    return tensor if offset is None else tensor.narrow(0, offset, param.numel()).view_as(param)


def optimizer_state_problem(optimizer: Any) -> str | None:
    """Why this (stepped) optimizer's state cannot be saved as whole tensors (then each rank saves its own), or None.

    Call it after the first step (the state is created then). Supported: state made of tensors with one
    value per element of the parameter, a "step" count and None entries (SGD without momentum).
    """
    base = _torch_optimizer(optimizer)
    for param, state in base.state.items():
        for key, value in state.items():
            if key == "step" or value is None:
                continue
            if not hasattr(value, "numel") or value.dim() == 0 or value.numel() != param.numel():
                return f"{type(base).__name__} (its state {key!r} is not one value per parameter element)"
    return None


def optim_flag_problem(training_args: Any) -> str | None:
    """`optimizer_state_problem` of the optimizer the `--optim` flag builds, told by stepping one on a 64x64 matrix.

    4096 elements: bitsandbytes keeps 8-bit (not per-element) state only from that size on, and
    32-bit state below it, which would pass.
    """
    import torch
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
    # On the run's device: some optimizers step accelerator tensors only.
    param = torch.nn.Parameter(torch.zeros(64, 64, device=local_device()))
    optimizer = optimizer_cls([param], **kwargs)
    param.grad = torch.ones_like(param)
    optimizer.step()
    return optimizer_state_problem(optimizer)


@contextlib.contextmanager
def _torch_optimizer_with_params(optimizer: Any) -> Iterator[Any]:
    # ZeRO-3 hands its flat fp32 partitions to the torch optimizer only for the length of a step (and of
    # its own state_dict); the same here. Other wrappers leave them in place.
    zero3 = _wrapper_with(optimizer, "_set_fp32_optimizer_param_groups")
    if zero3 is not None:
        zero3._set_fp32_optimizer_param_groups()
    try:
        yield _torch_optimizer(optimizer)
    finally:
        if zero3 is not None:
            zero3._clear_fp32_optimizer_param_groups()


def rank_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """This rank's torch optimizer's state_dict, over this rank's (ZeRO) partitions."""
    with _torch_optimizer_with_params(optimizer) as inner:
        return inner.state_dict()


def load_rank_optimizer_state(optimizer: Any, state_dict: dict[str, Any]) -> None:
    """Put what `rank_optimizer_state` returned back, on a run with the same ranks and ZeRO stage."""
    with _torch_optimizer_with_params(optimizer) as inner:
        inner.load_state_dict(state_dict)


def gather_weights(module: Any, optimizer: Any) -> dict[str, Any]:
    """Every trained parameter's fp32 (master) value, whole. All ranks must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _masters(optimizer)
    return {name: safe_get_full_fp32_param(param) if _is_partitioned(param)
            else _part(*masters.get(id(param), (param, None)), param).detach().float()
            for name, param in _trained(module)}


def restore_weights(module: Any, optimizer: Any, weights: dict[str, Any]) -> None:
    """Put saved whole fp32 trained weights into a running module, each rank its part.

    Both copies are set: the parameter the forward pass reads (compute dtype; under ZeRO-3 a
    partition, gathered and re-partitioned here) and ZeRO's fp32 master that the optimizer
    steps, so the next step equals the one of a run that never stopped. All ranks must call it.
    """
    import torch
    from deepspeed import zero
    from deepspeed.utils import safe_set_full_fp32_param

    masters = _masters(optimizer)
    with torch.no_grad():
        for name, param in _trained(module):
            value = weights[name].to(param.device)
            with zero.GatheredParameters([param], modifier_rank=0, enabled=hasattr(param, "ds_id")):
                param.data.copy_(value.view_as(param.data).to(param.dtype))
            if _is_partitioned(param):
                safe_set_full_fp32_param(param, value)
            elif id(param) in masters:
                _part(*masters[id(param)], param).copy_(value.view_as(param.data))


def _link_zero_state(optimizer: Any) -> None:
    """Point every ZeRO-1/2 parameter's slice at the optimizer state of its flat fp32 partition.

    deepspeed 0.19.8 links them once, right after the torch optimizer stepped the *first* param
    group: with two groups (weight decay and none, as full fine-tuning has) the second group's
    parameters keep an empty link and safe_get/set_full_optimizer_state fail ("exp_avg not found
    in optimizer state fragment"). Linking again once every group has its state fixes that.
    """
    zero = _wrapper_with(optimizer, "_lazy_init_hp_params_optimizer_state")
    if zero is not None:
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def gather_optimizer_state(module: Any, optimizer: Any) -> dict[str, Any]:
    """Every trained parameter's optimizer state, whole ("<name>.exp_avg", ...), after at least one step."""
    from deepspeed.utils import safe_get_full_optimizer_state

    state, masters = _torch_optimizer(optimizer).state, _masters(optimizer)
    keys = _state_keys(optimizer)
    _link_zero_state(optimizer)

    def whole(param: Any, key: str) -> Any:
        if _is_partitioned(param):
            return safe_get_full_optimizer_state(param, key)
        master, offset = masters.get(id(param), (param, None))
        return _part(state[master][key], offset, param)

    return {f"{name}.{key}": whole(param, key) for name, param in _trained(module) for key in keys}


def restore_optimizer_state(module: Any, optimizer: Any, saved: dict[str, Any], step: int | None) -> None:
    """Put saved optimizer state (whole tensors, `step`: the saved step count or None) into a fresh run's
    optimizer, each rank its slice.

    Optimizers create their state lazily at the first step, so it is created here (zeros, the saved
    step count) before the saved tensors are written into it. The weights need nothing when the
    module was given them before the optimizer (and ZeRO's fp32 master) was built.
    """
    import torch

    trained = _trained(module)
    first = f"{trained[0][0]}."
    keys = [name[len(first):] for name in saved if name.startswith(first)]
    base = _torch_optimizer(optimizer)
    # ZeRO-3 hands its flat fp32 partitions to the torch optimizer only for the length of a step.
    zero3 = _wrapper_with(optimizer, "fp32_partitioned_groups_flat")
    flats = zero3.fp32_partitioned_groups_flat if zero3 is not None else [
        flat for group in base.param_groups for flat in group["params"]]
    # torch's own optimizers count steps in a tensor (one each: it is incremented in place), DeepSpeed's
    # CPU Adam in an int; SGD counts none.
    in_tensor = type(base).__module__.startswith("torch.optim")
    for flat in flats:
        base.state[flat] = {key: torch.zeros_like(flat) for key in keys}
        if step is not None:
            base.state[flat]["step"] = torch.tensor(float(step)) if in_tensor else step
    partitioned = any(_is_partitioned(param) for _, param in trained)
    # ZeRO-1/2 link every parameter's slice to the state just created at their first step: done here.
    _link_zero_state(optimizer)
    from deepspeed.utils import safe_set_full_optimizer_state

    masters = _masters(optimizer)
    for name, param in trained:
        master, offset = masters.get(id(param), (param, None))
        for key in keys:
            value = saved[f"{name}.{key}"].to(param.device)
            if partitioned:
                safe_set_full_optimizer_state(param, value, key)
            else:
                _part(base.state[master][key], offset, param).copy_(value.view_as(param))


# What a dynamic loss scaler changes as it runs (the rest is its configuration). ZeRO's optimizers keep a
# (Dynamic)LossScaler as .loss_scaler, FP16_(Unfused)Optimizer a LossScaleConfig as .loss_scale_config.
_LOSS_SCALE_STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _loss_scaler(optimizer: Any) -> Any:
    for attribute in ("loss_scaler", "loss_scale_config"):
        wrapper = _wrapper_with(optimizer, attribute)
        if wrapper is not None:
            return getattr(wrapper, attribute)
    return None


def loss_scale_state(optimizer: Any) -> dict[str, Any] | None:
    """The state of DeepSpeed's loss scaler (fp16: the scale, when it last overflowed, ...), or None without one.

    A resumed fp16 run that started again from the initial scale would skip other steps than the
    interrupted one (each overflow skips a step), so its weights would differ.
    """
    scaler = _loss_scaler(optimizer)
    if scaler is None:
        return None
    values = {key: getattr(scaler, key) for key in _LOSS_SCALE_STATE if hasattr(scaler, key)}
    return {key: value.item() if hasattr(value, "item") else value for key, value in values.items()}


def restore_loss_scale(optimizer: Any, state: dict[str, Any] | None) -> None:
    """Put what `loss_scale_state` returned back into a fresh run's loss scaler."""
    scaler = _loss_scaler(optimizer)
    if scaler is not None and state:
        for key, value in state.items():
            setattr(scaler, key, value)


def restore_scheduler(scheduler: Any, state: dict[str, Any]) -> None:
    """Put a saved LR scheduler state back, and its learning rates into the optimizer's groups
    (the scheduler's state alone leaves them at their initial values until its next step)."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper (a DeepSpeed config "optimizer")
    scheduler.load_state_dict(state)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def _first_state(optimizer: Any) -> dict[str, Any]:
    # One parameter's state in the innermost optimizer ({} before its first step).
    return next(iter(_torch_optimizer(optimizer).state.values()), {})


def _state_keys(optimizer: Any) -> list[str]:
    # The per-element tensors the (innermost) optimizer keeps for each parameter.
    return [key for key, value in _first_state(optimizer).items()
            if key != "step" and value is not None and value.dim() > 0]


def optimizer_step(optimizer: Any) -> int | None:
    """How many updates the (innermost) optimizer has made by its per-parameter step count (None: it keeps none)."""
    state = _first_state(optimizer)
    return int(state["step"]) if "step" in state else None


def rank_share(items: list[Any], rank: int, world: int) -> list[Any]:
    """This rank's items of a data-parallel stage: every world-th one, starting at `rank` (balanced, in order)."""
    return items[rank::world]


def gather_shares(share: list[Any], world: int) -> list[Any]:
    """Undo `rank_share` on every rank: all ranks' shares interleaved back into the full order (a collective)."""
    if world == 1:
        return share
    import torch.distributed as dist

    shares: list[list[Any]] = [[] for _ in range(world)]
    dist.all_gather_object(shares, share)
    merged = []
    for position in range(max(len(s) for s in shares)):
        merged += [s[position] for s in shares if position < len(s)]
    return merged
