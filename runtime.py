"""
Where a training run executes, for train.py: its processes (one, or many under torchrun with DDP or FSDP), its device
and precision, and the model wrapped for them.

    runtime = start_processes(config)      # joins torchrun's process group if there is one; picks device and dtype
    model = wrap(model, config, runtime)   # DDP or FSDP across processes; the model itself for one
    unwrap(model)                          # the TinyLLaVA inside any wrapper
"""
import contextlib
import os
import platform
import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from flags import Stop
from llama import Block


def cpu_name():
    """The CPU's model name as lscpu gives it, and whether it has AVX-512 (the figures here depend on both)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    return name + (" with AVX-512" if " avx512f" in info else " without AVX-512")


@dataclass
class Runtime:
    """Where this process trains: its device, its autocast dtype (None: float32) and its place among the processes."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_dtype: torch.dtype | None = None
    rank: int = 0
    world_size: int = 1
    distributed: bool = False  # under torchrun: a process group exists and gradients are averaged over it
    fsdp: bool = False
    pad_token_id: int = 0

    @property
    def master(self):
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def start_processes(config):
    """Join the process group when run by torchrun (NCCL on GPUs, gloo on CPUs); pick the device and precision."""
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise Stop("--device cuda, but torch sees no CUDA device")
    runtime = Runtime(distributed="RANK" in os.environ)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True  # and TF32 convolutions (the patch embedding)
    if runtime.distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
        runtime.rank, runtime.world_size = dist.get_rank(), dist.get_world_size()
    elif config.fsdp:
        raise Stop("--fsdp shards over processes: run it under torchrun")
    runtime.device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if config.dtype == "bfloat16" or (config.dtype == "auto" and cuda):
        runtime.autocast_dtype = torch.bfloat16
    runtime.fsdp = config.fsdp
    if config.threads:
        torch.set_num_threads(config.threads)
    return runtime


def end_processes(runtime):
    if runtime is not None and runtime.distributed and dist.is_initialized():
        dist.barrier()  # nobody leaves while another still talks (gloo aborts a process whose peer is gone)
        dist.destroy_process_group()


def all_reduce_sum(values, runtime):
    """Sum a float64 vector over the processes (a no-op for one process)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if runtime.distributed:
        tensor = tensor.to(runtime.device)
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


class GracefulStop:
    """Inside `with GracefulStop() as stop:`, SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop; torchrun's to its
    workers on Ctrl-C) only ask the run to stop: it finishes the step in progress and writes a checkpoint. A second
    SIGINT stops at once (KeyboardInterrupt). stop.asked: the first signal's name, or None."""

    def __enter__(self):
        self.asked = None
        self.previous = {kind: signal.signal(kind, self.handle) for kind in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exception):
        for kind, handler in self.previous.items():
            signal.signal(kind, handler)

    def handle(self, kind, frame):  # no printing here: the signal may have interrupted a print
        if self.asked and kind == signal.SIGINT:
            raise KeyboardInterrupt
        self.asked = self.asked or signal.Signals(kind).name

    def agreed(self, runtime):
        """Whether any process was asked to stop: the same answer in every process, so they stop at the same step.
        The answer is the all-reduced one only: a signal that lands after this process gave its flag is seen at the
        next step, by all."""
        if all_reduce_sum([float(self.asked is not None)], runtime)[0] == 0:
            return False
        self.asked = self.asked or "SIGTERM to another process"
        return True


def wrap(model, config, runtime):
    """DDP (replicas, gradients averaged) or FSDP (the LLM's blocks sharded, the frozen tower kept whole outside it)
    across processes; the model itself for one process. The parameters stay the same objects."""
    if config.fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        model.vision.to(runtime.device)
        mixed = None
        if runtime.device.type == "cuda" and runtime.autocast_dtype == torch.bfloat16:  # bf16 compute, fp32 reduce
            mixed = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Block}), ignored_states=[
            model.vision], use_orig_params=True, device_id=runtime.device, mixed_precision=mixed)
    elif runtime.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    return model


def unwrap(model):
    """The TinyLLaVA inside torch.compile, DDP and FSDP wrappers."""
    for attribute in ("_orig_mod", "module", "_fsdp_wrapped_module"):
        if hasattr(model, attribute) and isinstance(getattr(model, attribute), torch.nn.Module):
            return unwrap(getattr(model, attribute))
    return model
