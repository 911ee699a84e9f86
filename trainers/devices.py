"""The device rules of a Ray Train worker (fine-tuning and students), one place for each.

- **GPU shares**: a worker takes one GPU or more. With several workers, a fractional `gpus_per_worker` lets
  Ray put two workers on one GPU, and NCCL refuses a process group with a GPU twice ("Duplicate GPU detected",
  ray-project/ray#48012): `check_gpu_share` refuses that config before Ray starts.
- **The worker's device** is Ray Train's `get_device()` (the lowest of the worker's GPUs). DeepSpeed picks its
  own from LOCAL_RANK, which is another GPU once a worker has two (worker 1 of 2 x 2 GPUs: DeepSpeed cuda:1,
  Ray cuda:2): `deepspeed_args` hands DeepSpeed the worker's device, and the train loop checks that the
  engine took it.
- **Collectives** run on that device: NCCL reduces CUDA tensors only ("No backend type associated with device
  type cpu"), while the CPU tests run gloo, which reduces anything. `all_reduce` refuses a tensor that is not
  on the worker's device under any backend, so the CPU suite catches what only NCCL would.
- **Mixed precision** for the students: bf16 autocast on a GPU (`autocast`), fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: the configs' checks (check_gpu_share) import no torch
    import torch


def check_gpu_share(workers: int, use_gpu: bool, gpus_per_worker: float) -> None:
    """Raises ValueError for a scaling config that NCCL would refuse at its first collective."""
    if not use_gpu:
        return
    if gpus_per_worker >= 1 and gpus_per_worker != int(gpus_per_worker):
        raise ValueError(f"gpus_per_worker must be whole GPUs or a fraction of one, got {gpus_per_worker}")
    if workers > 1 and gpus_per_worker < 1:
        raise ValueError(
            f"gpus_per_worker {gpus_per_worker} with {workers} workers would put two workers on one GPU, "
            "which NCCL refuses ('Duplicate GPU detected'); give each worker 1 GPU or more, or use 1 worker"
        )


def deepspeed_args(device: torch.device) -> argparse.Namespace | None:
    """What `deepspeed.initialize(args=...)` needs to put its engine on `device`: DeepSpeed takes
    `args.device_rank` over LOCAL_RANK. None on the CPU, where DeepSpeed's LOCAL_RANK path is right."""
    if device.type != "cuda":
        return None
    return argparse.Namespace(device_rank=device.index if device.index is not None else 0)


def skip_inference_allreduce_build(device: torch.device) -> None:
    """On the CPU, keep DeepSpeed from JIT-compiling its shared-memory all-reduce op (`deepspeed_shm_comm`)
    when its communication backend starts. Only `inference_all_reduce` (DeepSpeed's tensor-parallel
    inference) calls that op; ZeRO training reduces through torch.distributed (gloo here), with or without
    it. The compile took 30-60 s in every fresh environment (each CI run, each new virtualenv path), inside
    the first fine-tuning run. Marked incompatible, DeepSpeed leaves it unbuilt, as on a machine without a
    compiler. GPUs are untouched (their accelerator has no such op)."""
    if device.type != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # a dict DeepSpeed keeps and reads


def check_engine_device(engine_device: torch.device | str, device: torch.device) -> None:
    """Raises RuntimeError if DeepSpeed's engine is not on the worker's device (the data goes there)."""
    import torch

    engine_device = torch.device(engine_device)
    same = engine_device.type == device.type and (
        device.type != "cuda" or (engine_device.index or 0) == (device.index or 0)
    )
    if not same:
        raise RuntimeError(f"DeepSpeed put the model on {engine_device}, the worker's data goes to {device}")


def all_reduce(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum `tensor` over the workers in place (a no-op without a process group); it must be on `device`."""
    import torch

    if tensor.device != device:
        raise RuntimeError(
            f"a collective got a tensor on {tensor.device}, not on the worker's device {device}: NCCL "
            "reduces CUDA tensors only"
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def autocast(device: torch.device, precision: str = "auto"):
    """The students' forward context: bf16 autocast on a GPU for `auto` or `bf16` (`train.precision`,
    validated by the config), nothing otherwise."""
    import torch

    if device.type == "cuda" and precision != "fp32":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
