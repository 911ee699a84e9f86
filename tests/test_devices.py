"""The Ray Train workers' device rules (trainers/devices.py), checked on the CPU: each guards a failure that
only GPUs show (issue 30). Where a GPU device is needed, `meta` or a named `cuda:N` device stands in: the
rules read only a device's type and index."""

import math

import pytest
import torch

from trainers.devices import all_reduce, autocast, check_engine_device, check_gpu_share, deepspeed_args


def test_two_workers_on_one_gpu_are_refused_before_ray_starts():
    from trainers.finetune.config import FinetuneConfig
    from trainers.students.config import StudentsConfig

    check_gpu_share(1, True, 0.5)  # one worker may share a GPU (a Tune trial of one worker)
    check_gpu_share(2, True, 1)
    check_gpu_share(4, False, 0.25)  # CPU workers: no GPU to share
    with pytest.raises(ValueError, match="Duplicate GPU"):
        check_gpu_share(2, True, 0.5)
    with pytest.raises(ValueError, match="whole GPUs"):
        check_gpu_share(1, True, 1.5)
    data = {"shards": ["out/x"]}
    with pytest.raises(ValueError, match="Duplicate GPU"):
        FinetuneConfig.model_validate(
            {"data": data, "scaling": {"workers": 2, "use_gpu": True, "gpus_per_worker": 0.5}}
        )
    with pytest.raises(ValueError, match="Duplicate GPU"):
        StudentsConfig.model_validate(
            {"data": data, "scaling": {"workers": 2, "use_gpu": True, "gpus_per_worker": 0.5}}
        )


def test_deepspeed_is_handed_the_workers_device_not_local_rank():
    """With 2 GPUs per worker, Ray Train's device for worker 1 is cuda:2 while LOCAL_RANK says 1."""
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine

    assert deepspeed_args(torch.device("cuda", 2)).device_rank == 2
    assert deepspeed_args(torch.device("cpu")) is None
    # the DeepSpeed we install takes args.device_rank over LOCAL_RANK (engine._set_distributed_vars)
    assert "args.device_rank" in inspect.getsource(DeepSpeedEngine._set_distributed_vars)
    check_engine_device("cuda:2", torch.device("cuda", 2))
    check_engine_device(torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="cuda:1.*cuda:2"):
        check_engine_device("cuda:1", torch.device("cuda", 2))


def test_every_tensor_given_to_a_collective_is_on_the_workers_device(monkeypatch):
    """NCCL reduces CUDA tensors only; gloo (the CPU tests) reduces anything, so the check is ours. The
    fine-tuning metrics used to be summed on the CPU whatever the device: `LossWindow` keeps them on it."""
    from trainers.finetune import worker
    from trainers.finetune.worker import LossTotals, LossWindow

    meta = torch.device("meta")  # stands in for a GPU
    with pytest.raises(RuntimeError, match="NCCL"):
        all_reduce(torch.zeros(3), meta)
    w = LossWindow(meta)
    w.add(torch.ones(4, device=meta), ["full", "background", "full", "full"])
    reduced = []  # what the collective is handed (a meta tensor has no values to read back)
    with monkeypatch.context() as m:
        m.setattr(worker, "all_reduce", lambda t, d: reduced.append((t.device, d)) or torch.zeros(t.shape))
        w.reduce()
    assert reduced == [(meta, meta)]

    cpu = LossWindow(torch.device("cpu"))
    cpu.add(torch.tensor([1.0, 2.0, 3.0]), ["full", "background", "full"])
    cpu.add(torch.tensor([4.0]), ["background"])
    totals = cpu.reduce()
    assert totals == LossTotals(10.0, 4.0, 4.0, 2.0, 6.0, 2.0)
    assert totals.metrics() == {"loss": 2.5, "loss_full": 2.0, "loss_background": 3.0}
    assert cpu.reduce() == LossTotals(*[0.0] * 6)  # a new window
    assert math.isnan(cpu.reduce().metrics()["loss_full"])  # a task not seen: NaN, not 0


def test_students_train_in_bf16_on_a_gpu_and_sum_their_loss_without_host_syncs(monkeypatch):
    from trainers.students.loop import LossSum

    with autocast(torch.device("cuda", 0)) as ctx:
        pass
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(autocast(torch.device("cuda", 0), "fp32"), torch.autocast)
    assert not isinstance(autocast(torch.device("cpu")), torch.autocast)  # CPU students stay fp32
    s = LossSum(torch.device("cpu"))

    def no_sync(self):
        raise AssertionError("a host sync inside the training loop")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    for v in (1.0, 2.0, 6.0):
        s.add(torch.tensor(v, requires_grad=True) * 1)
    monkeypatch.undo()
    assert s.n == 3 and s.mean() == 3.0


def test_cpu_fine_tuning_does_not_compile_deepspeeds_inference_allreduce():
    """The shared-memory all-reduce op is DeepSpeed's for tensor-parallel inference only; building it cost
    every fresh environment 30-60 s in the first fine-tuning run. Skipped on the CPU, untouched on a GPU."""
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    from trainers.devices import skip_inference_allreduce_build

    before = dict(deepspeed.ops.__compatible_ops__)
    skip_inference_allreduce_build(torch.device("cuda", 0))
    assert deepspeed.ops.__compatible_ops__ == before
    skip_inference_allreduce_build(torch.device("cpu"))
    assert build_shm_op() is None  # DeepSpeed's own check: nothing is built
    deepspeed.ops.__compatible_ops__.update(before)
