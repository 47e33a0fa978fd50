"""Optimizer grouping, Muon, schedules and optimizer state round trips."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_gpt

from gpt2 import optim
from gpt2.config import OptimConfig
from gpt2.errors import UserError
from gpt2.optim import Muon, build_optimizer, lr_at, set_lr


def test_cosine_schedule_warmup_peak_and_floor():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    assert lr_at(0, cfg, 200) == pytest.approx(1 / 11)
    assert lr_at(9, cfg, 200) == pytest.approx(10 / 11)
    assert lr_at(10, cfg, 200) == pytest.approx(1.0)
    assert lr_at(60, cfg, 200) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, cfg, 200) == pytest.approx(0.1)
    assert lr_at(150, cfg, 200) == pytest.approx(0.1)
    # the decay horizon defaults to max_iters
    assert lr_at(99, OptimConfig(lr=1.0, min_lr=0.0, warmup_iters=0), 100) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 99 / 100))
    )


def test_wsd_schedule_holds_then_decays_linearly():
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_iters=10, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[10:80] == [1.0] * 70  # stable phase
    assert lrs[80] == 1.0 and lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_adamw_decays_only_matrices_and_embeddings():
    model = tiny_gpt()
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), "cpu")
    (adamw,) = opt.optimizers
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_opt = sum(p.numel() for g in adamw.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())  # tied weight counted once


def test_adamw_matches_torch_adamw():
    """Our grouping + schedule plumbing steps exactly like a hand-built torch AdamW (fused, as on the CPU)."""
    a, b = tiny_gpt(), tiny_gpt()
    cfg = OptimConfig(lr=1e-2, min_lr=1e-3, weight_decay=0.1, warmup_iters=2)
    ours = build_optimizer(a, cfg, "cpu")
    decay = [p for p in b.parameters() if p.dim() >= 2]
    no_decay = [p for p in b.parameters() if p.dim() < 2]
    ref = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        betas=(0.9, 0.95),
        fused=True,
    )
    x = torch.randint(0, 64, (4, 16))
    for step in range(5):
        lr = set_lr(ours, step, cfg, max_iters=10)
        for g in ref.param_groups:
            g["lr"] = lr
        for model, opt in ((a, ours), (b, ref)):
            model(x, x)[1].backward()
            opt.step()
            opt.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_muon_splits_hidden_matrices_and_trains():
    model = tiny_gpt()
    cfg = OptimConfig(name="muon", lr=3e-3, muon_lr=0.02, warmup_iters=0, weight_decay=0.0)
    opt = build_optimizer(model, cfg, "cpu")
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon)
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expect_muon = p.dim() == 2 and name.startswith("transformer.h.")
        assert (id(p) in muon_params) == expect_muon, name
    x = torch.randint(0, 64, (8, 16))
    losses = []
    for step in range(20):
        set_lr(opt, step, cfg, max_iters=20)
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_in_fp32_steps_like_torchs_muon_run_in_fp32(monkeypatch, nesterov):
    """The fp32 path equals torch.optim.Muon's own code with its bf16 cast made a no-op (tall and wide matrices,
    momentum, weight decay, several steps), and stays within bf16 rounding of torch's real (bf16) Muon."""
    torch.manual_seed(0)
    start = [torch.randn(48, 16), torch.randn(16, 40)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(4)]

    def run(make):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        return params

    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov)
    ours = run(lambda ps: Muon(ps, ns_dtype=torch.float32, **kwargs))
    torchs_bf16 = run(lambda ps: torch.optim.Muon(ps, **kwargs))
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "bfloat16", lambda self, *a, **k: self.clone())
        torchs_fp32 = run(lambda ps: torch.optim.Muon(ps, **kwargs))
    for a, b, c, w in zip(ours, torchs_fp32, torchs_bf16, start):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert (a - c).norm() < 0.02 * (c - w).norm()


@pytest.mark.parametrize(
    "auto_dtype, ns_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.float16, torch.float32)],
)
def test_muon_orthogonalizes_in_bf16_only_where_the_device_has_native_bf16(monkeypatch, auto_dtype, ns_dtype):
    """torch's Muon casts to bf16 always; on an AVX2 CPU or a T4 that is emulated (13x slower step)."""
    monkeypatch.setattr(optim, "resolve_dtype", lambda name, device: auto_dtype)
    muon = build_optimizer(tiny_gpt(), OptimConfig(name="muon"), "cpu").optimizers[0]
    assert muon.ns_dtype == ns_dtype


def test_set_lr_scales_muon_groups_by_the_same_factor():
    model = tiny_gpt()
    cfg = OptimConfig(name="muon", lr=1e-3, min_lr=1e-4, muon_lr=0.02, warmup_iters=0)
    opt = build_optimizer(model, cfg, "cpu")
    lr = set_lr(opt, 100, cfg, max_iters=100)
    assert lr == pytest.approx(1e-4)
    assert opt.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.002)
    assert all(g["lr"] == pytest.approx(1e-4) for g in opt.optimizers[1].param_groups)


def test_state_round_trip_and_mismatch():
    model = tiny_gpt()
    opt = build_optimizer(model, OptimConfig(), "cpu")
    model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))[1].backward()
    opt.step()
    state = opt.state_dict()
    fresh = build_optimizer(model, OptimConfig(), "cpu")
    fresh.load_state_dict(state)
    assert fresh.state_dict()["state"].keys() == state["state"].keys()
    with pytest.raises(UserError, match="optim.name"):
        build_optimizer(model, OptimConfig(name="muon"), "cpu").load_state_dict(state)
