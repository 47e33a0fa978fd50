"""MFU: never an impossible value; the CPU ceiling is a best-of over repeated matmuls."""

from __future__ import annotations

import time

import torch

from gpt2 import flops, metrics


def test_mfu_is_a_fraction_of_the_peak_and_never_above_one():
    assert flops.mfu(1e9, 100.0, 1e12, world_size=1) == 0.1
    assert flops.mfu(1e9, 100.0, 1e12, world_size=4) == 0.025
    assert flops.mfu(1e9, 100.0, None, world_size=1) is None
    # A busy machine at start-up made the measured ceiling too low: no MFU rather than 134%.
    assert flops.mfu(1e9, 1340.0, 1e12, world_size=1) is None
    line = metrics.format_line({"step": 1, "loss": 1.0, "tokens_per_sec": 1340.0})
    assert "mfu" not in line


def test_cpu_ceiling_is_a_best_of_many_repetitions(monkeypatch):
    flops._CPU_CEILING.clear()
    calls = []
    real_matmul = torch.Tensor.__matmul__

    def counting(a, b):
        calls.append(time.perf_counter())
        return real_matmul(a, b)

    monkeypatch.setattr(torch.Tensor, "__matmul__", counting)
    t0 = time.perf_counter()
    ceiling = flops.cpu_matmul_flops(torch.float32, n=256, min_iters=10, min_seconds=0.2)
    n = len(calls)
    assert n >= 11 and time.perf_counter() - t0 >= 0.2  # warm-up + at least 10 timed, and at least 0.2 s
    assert flops.cpu_matmul_flops(torch.float32, n=256) == ceiling and len(calls) == n  # cached per process
    monkeypatch.undo()
    flops._CPU_CEILING.clear()
    # The best of many is at least what a single timed matmul reaches.
    a = torch.randn(256, 256)
    t0 = time.perf_counter()
    a @ a
    single = 2 * 256**3 / (time.perf_counter() - t0)
    assert flops.cpu_matmul_flops(torch.float32, n=256, min_iters=10, min_seconds=0.2) >= 0.5 * single
    flops._CPU_CEILING.clear()


def test_records_are_replayed_once_and_broken_ones_dropped(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "val_loss": 4.0}, {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.9}]
    path.write_text("".join(f"{__import__('json').dumps(r)}\n" for r in lines) + '{"step": 3, "lo')
    metrics.MetricsLogger(tmp_path).start(resume_step=1).close()  # resumed at step 1: step 2 is replayed
    assert path.read_text().splitlines() == ['{"step": 0, "val_loss": 4.0}', '{"step": 1, "loss": 3.0}']
    assert "dropped 1 incomplete record(s)" in capsys.readouterr().out
    metrics.MetricsLogger(tmp_path).start().close()  # a fresh run: an earlier attempt left records but no checkpoint
    assert path.read_text() == "" and "cleared the records of an earlier attempt" in capsys.readouterr().out


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    import errno

    import pytest

    from gpt2.errors import UserError

    logger = metrics.MetricsLogger(tmp_path).start()

    class Full:
        name = str(tmp_path / "metrics.jsonl")

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    logger._file = Full()
    with pytest.raises(UserError, match=r"cannot write .*metrics.jsonl \(No space left on device\): a full disk\?"):
        logger.log({"loss": 1.0}, 1)


GPU_NAMES = {  # what torch.cuda.get_device_name returns on each, -> the table row it must hit
    "NVIDIA GB200": "GB200",
    "NVIDIA B200": "B200",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA H200": "H200",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 80GB HBM3": "H100",
    "NVIDIA H800": "H800",
    "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A800 80GB PCIe": "A800",
    "NVIDIA L40S": "L40S",
    "NVIDIA L40": "L40",
    "NVIDIA L4": "L4",
    "NVIDIA A10G": "A10G",
    "NVIDIA A10": "A10",
    "NVIDIA RTX A6000": "A6000",
    "NVIDIA GeForce RTX 4090": "RTX 4090",
    "NVIDIA GeForce RTX 3090": "RTX 3090",
    "Tesla V100-SXM2-16GB": "V100",
    "Tesla T4": "T4",
}


def test_every_gpu_row_is_reachable_and_fp32_means_what_the_gpu_has():
    rows = {key: (half, single) for key, half, single in flops.CUDA_PEAK_FLOPS}
    assert set(GPU_NAMES.values()) == set(rows)  # every row is reached by its GPU's real name
    for name, key in GPU_NAMES.items():
        assert flops.cuda_peak_flops(name, torch.bfloat16) == rows[key][0], name
        assert flops.cuda_peak_flops(name, torch.float32) == rows[key][1], name
    assert flops.cuda_peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == 494.5e12  # TF32
    assert flops.cuda_peak_flops("Tesla V100-SXM2-16GB", torch.float32) == 15.7e12  # no TF32 on Volta
    assert flops.cuda_peak_flops("Tesla T4", torch.float16) == 65e12
    assert flops.cuda_peak_flops("Some Future GPU", torch.bfloat16) is None
