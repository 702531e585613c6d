"""MSAD and DINO losses: batched MSAD equals the per-position definition, gradients reach the
encoder and every head, the loss trains on pairs that share content, and gathered negatives
across two gloo ranks give the single-process loss."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from xstars_models.heads import DINOHead
from xstars_models.losses import DINOLoss, MSADLoss


def per_position_msad(loss: MSADLoss, z_a, z_b, sensor_a, sensor_b) -> torch.Tensor:
    """method.md, literally: one projection and one soft-target CLIP loss per token position."""
    tau = loss.temperature
    start = 0 if loss.include_cls else 1
    losses = []
    for i in range(start, z_a.shape[1]):
        e_a = loss.sensor_heads[sensor_a](loss.shared(z_a[:, i]))
        e_b = loss.sensor_heads[sensor_b](loss.shared(z_b[:, i]))
        if loss.normalize:
            e_a, e_b = F.normalize(e_a, dim=-1), F.normalize(e_b, dim=-1)
        logits = e_b @ e_a.T / tau
        targets = F.softmax((e_a @ e_a.T + e_b @ e_b.T) / 2 / tau, dim=-1)
        eps = loss.label_smoothing
        targets = (1 - eps) * targets + eps / len(targets)
        ce = lambda p, t: (-t * F.log_softmax(p, dim=-1)).sum(1).mean()  # noqa: E731
        losses.append((ce(logits, targets) + ce(logits.T, targets.T)) / 2)
    return torch.stack(losses).mean()


@pytest.mark.parametrize("include_cls", [True, False])
@pytest.mark.parametrize("setting", ["reference", "default"])
def test_batched_msad_equals_the_per_position_definition(setting, include_cls):
    torch.manual_seed(0)
    if setting == "reference":
        loss = MSADLoss.reference(48, ["a", "b"], width=64)
    else:
        loss = MSADLoss(48, ["a", "b"], width=64)
    loss.include_cls = include_cls
    loss.eval()  # no dropout, so both computations see the same projections
    z_a, z_b = torch.randn(6, 17, 48), torch.randn(6, 17, 48)
    batched = loss(z_a, z_b, "a", "b")
    assert torch.allclose(batched, per_position_msad(loss, z_a, z_b, "a", "b"), atol=1e-5, rtol=1e-5)


def test_reference_setting_matches_official_values():
    loss = MSADLoss.reference(8, ["a", "b"])
    assert float(loss.temperature) == 1.0 and not loss.normalize and loss.label_smoothing == 0.3 and loss.include_cls
    assert not any(p is loss.log_tau for p in loss.parameters())


def test_gradient_reaches_encoder_heads_and_temperature():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(16, 32)
    loss = MSADLoss(32, ["a", "b"], width=32)
    x_a, x_b = torch.randn(4, 10, 16), torch.randn(4, 10, 16)
    loss(encoder(x_a), encoder(x_b), "a", "b").backward()
    for name, p in [*encoder.named_parameters(), *loss.named_parameters()]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unknown_sensor_and_mismatched_grids():
    loss = MSADLoss(8, ["a", "b"], width=8)
    with pytest.raises(ValueError, match="no projection head for sensor 'c'"):
        loss(torch.randn(2, 5, 8), torch.randn(2, 5, 8), "a", "c")
    with pytest.raises(ValueError, match=r"same batch and token grid.*a gives \(2, 5, 8\), b gives \(2, 9, 8\)"):
        loss(torch.randn(2, 5, 8), torch.randn(2, 9, 8), "a", "b")


def test_msad_trains_when_pairs_share_content():
    torch.manual_seed(0)
    mixing = torch.randn(16, 16)
    encoder_a, encoder_b = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32)
    loss = MSADLoss(32, ["a", "b"], width=32, dropout=0.0)
    params = [*encoder_a.parameters(), *encoder_b.parameters(), *loss.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    values = []
    for _ in range(60):
        x = torch.randn(16, 9, 16)
        y = x @ mixing + 0.05 * torch.randn_like(x)  # sensor B sees the same content, transformed
        value = loss(encoder_a(x), encoder_b(y), "a", "b")
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(float(value.detach()))
    assert sum(values[-5:]) / 5 < 0.7 * sum(values[:5]) / 5


def test_dino_loss_centre_schedule_and_training():
    torch.manual_seed(0)
    dino = DINOLoss(out_dim=16, n_global=2, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_steps=10)
    assert dino.teacher_temp_at(0) == pytest.approx(0.04) and dino.teacher_temp_at(5) == pytest.approx(0.055)
    assert dino.teacher_temp_at(10) == pytest.approx(0.07) and dino.teacher_temp_at(100) == pytest.approx(0.07)
    teacher_out = torch.randn(8, 16)
    dino(torch.randn(12, 16), teacher_out, 0)
    assert torch.allclose(dino.center, 0.1 * teacher_out.mean(0, keepdim=True), atol=1e-6)
    with pytest.raises(ValueError, match="not 2 global views"):
        dino(torch.randn(12, 16), torch.randn(7, 16), 0)

    head = DINOHead(8, 16, hidden_dim=32, bottleneck_dim=8)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    student, teacher = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    optimizer = torch.optim.Adam([*student.parameters(), *head.parameters()], lr=1e-2)
    fresh = DINOLoss(out_dim=16)
    x = torch.randn(4, 8)
    views = torch.cat([x + 0.01 * torch.randn_like(x) for _ in range(3)])
    values = []
    for step in range(40):
        with torch.no_grad():
            target = head(teacher(views[:8]))
        value = fresh(head(student(views)), target, step)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(float(value.detach()))
    assert torch.isfinite(torch.tensor(values)).all() and values[-1] < values[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, z_a: torch.Tensor, z_b: torch.Tensor, state: dict, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    loss = MSADLoss(16, ["a", "b"], width=16)
    loss.load_state_dict(state)
    loss.eval()
    half = len(z_a) // 2
    local_a = z_a[rank * half : (rank + 1) * half].clone().requires_grad_(True)
    local_b = z_b[rank * half : (rank + 1) * half].clone().requires_grad_(True)
    value = loss(local_a, local_b, "a", "b")
    # The trainer averages gradients over ranks; the objective is the mean of the ranks' losses.
    (value / 2).backward()
    out[rank] = (float(value), local_a.grad.clone(), local_b.grad.clone())
    dist.destroy_process_group()


def test_negatives_gathered_across_two_gloo_ranks_match_one_process():
    torch.manual_seed(0)
    z_a, z_b = torch.randn(8, 5, 16), torch.randn(8, 5, 16)
    reference = MSADLoss(16, ["a", "b"], width=16).eval()
    full_a, full_b = z_a.clone().requires_grad_(True), z_b.clone().requires_grad_(True)
    expected = reference(full_a, full_b, "a", "b")
    expected.backward()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_worker, args=(_free_port(), z_a, z_b, reference.state_dict(), out), nprocs=2, join=True)
        results = dict(out)
    assert (results[0][0] + results[1][0]) / 2 == pytest.approx(float(expected.detach()), abs=1e-5)
    assert torch.allclose(torch.cat([results[0][1], results[1][1]]), full_a.grad, atol=1e-6)
    assert torch.allclose(torch.cat([results[0][2], results[1][2]]), full_b.grad, atol=1e-6)
