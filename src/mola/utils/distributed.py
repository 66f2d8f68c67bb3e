"""Process-group helpers for data-parallel training (``torchrun`` / ``accelerate launch``).

Everything here works without a process group too: one process is then rank 0 of a world of
one, the main process, and every reduction returns its input. The launchers describe the world
in environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), which are read before the
process group exists, so that the main-process checks hold from the first line of a run.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is up."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes training together (1 without a launcher)."""
    if is_initialized():
        return dist.get_world_size()
    return max(_env_int("WORLD_SIZE", 1), 1)


def rank() -> int:
    """This process's global rank (0 without a launcher)."""
    if is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's rank on its own machine (0 without a launcher)."""
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True on global rank 0: the one process that writes outputs and prints progress."""
    return rank() == 0


def is_local_main_process() -> bool:
    """True on each machine's local rank 0."""
    return local_rank() == 0


def is_distributed() -> bool:
    """True when more than one process trains (a process group is up with world size > 1)."""
    return is_initialized() and dist.get_world_size() > 1


def backend() -> str:
    """The process group's backend (``gloo``, ``nccl``, ...), or ``none``."""
    return str(dist.get_backend()) if is_initialized() else "none"


def barrier() -> None:
    """Wait for every process; a no-op without a process group."""
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    """Destroy the process group, if one is up, before the interpreter exits.

    Left to interpreter teardown, gloo's background threads can abort a process at exit
    ("terminate called without an active exception", exit -6) after training succeeded.
    """
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all processes, as a new tensor without autograd history.

    Every process must call this the same number of times with the same shape.
    """
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of ``tensor`` over all processes (a new, detached tensor)."""
    out = tensor.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def any_process(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` is true on at least one process (a collective: all must call it)."""
    if not is_distributed():
        return flag
    return bool(all_reduce_max(torch.tensor([float(flag)], device=device)).item() > 0)


def global_sums(local: torch.Tensor, plain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over all processes of ``local`` (differentiable) and ``plain`` (not), in one all-reduce.

    Both values are the global sums, the same on every process. The gradient of the first flows
    to this process's own ``local`` only, multiplied by the world size: DDP, FSDP and DeepSpeed
    divide the summed gradients by the world size, so the factor makes the averaged gradient
    equal to the gradient of the global sum that one process holding the whole batch computes.
    Without a process group (or with one process) both come back unchanged.
    """
    if not is_distributed():
        return local, plain
    n = local.numel()
    both = all_reduce_sum(
        torch.cat([local.detach().reshape(-1), plain.to(local.dtype).reshape(-1)])
    )
    total = both[:n].reshape(local.shape) + world_size() * (local - local.detach())
    return total, both[n:].reshape(plain.shape)


def check_launch() -> None:
    """Refuse a launch that asked for several processes but started only this one.

    ``accelerate launch --cpu --num_processes N`` starts a single process unless it is given an
    MPI host file: it sets ``MASTER_ADDR`` for the N processes but no ``RANK``/``WORLD_SIZE``,
    so that one process would silently train alone on the whole data set.

    Raises:
        ValueError: that launch, with the commands that do start N processes.
    """
    env = os.environ
    asked_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes")
    launched = any(
        name in env
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
    )
    if asked_cpu and "MASTER_ADDR" in env and not launched:
        raise ValueError(
            "accelerate launch --cpu --num_processes N starts only one process (it needs "
            "--mpirun_hostfile for more); on CPU use `accelerate launch --multi_gpu "
            "--num_processes N` or `torchrun --nproc_per_node N` (both use gloo without a GPU)"
        )
