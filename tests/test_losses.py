"""MSAD and DINO losses: batched MSAD equals the per-position definition for every option,
gradients reach the encoder, every head and the temperature, the loss aligns pairs that share
content (and only those), DINO's centre and schedule behave, and gathered negatives across two
gloo ranks give the single-process loss and gradients."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from xstars_models.errors import InvalidInputError, InvalidOptionError
from xstars_models.losses import DINOLoss, MaskedTokenLoss, MSADLoss, random_patch_mask
from xstars_models.training.heads import DINOHead


def per_position_msad(loss: MSADLoss, z_a: torch.Tensor, z_b: torch.Tensor, sensor_a: str, sensor_b: str) -> torch.Tensor:
    """method.md, literally: for each position i, project with g then h_A / h_B, L = e_B e_A^T / tau,
    T = softmax((e_A e_A^T + e_B e_B^T) / 2 / tau) row-wise, loss_i = (CE(L, T) + CE(L^T, T^T)) / 2
    with label smoothing, averaged over the batch; MSAD = mean over positions."""
    tau = loss.temperature
    eps = loss.label_smoothing
    first = 1 if loss.has_cls and not loss.include_cls else 0

    def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        smoothed = (1 - eps) * targets + eps / targets.shape[1]
        return -(smoothed * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

    losses = []
    for i in range(first, z_a.shape[1]):
        e_a = loss.sensor_heads[sensor_a](loss.shared(z_a[:, i]))
        e_b = loss.sensor_heads[sensor_b](loss.shared(z_b[:, i]))
        if loss.normalize:
            e_a, e_b = F.normalize(e_a, dim=1), F.normalize(e_b, dim=1)
        logits = e_b @ e_a.T / tau
        targets = F.softmax((e_a @ e_a.T + e_b @ e_b.T) / 2 / tau, dim=1)
        losses.append((cross_entropy(logits, targets) + cross_entropy(logits.T, targets.T)) / 2)
    return torch.stack(losses).mean()


SETTINGS = {
    "reference": lambda: MSADLoss.reference(48, ["a", "b"], width=64),
    "default": lambda: MSADLoss(48, ["a", "b"], width=64),
    "fixed tau 0.5, raw, no smoothing": lambda: MSADLoss(
        48, ["a", "b"], width=64, temperature=0.5, learnable_temperature=False, normalize=False, label_smoothing=0.0
    ),
}
TOKENS = {"CLS used": (True, True), "CLS skipped": (True, False), "no CLS": (False, False)}


def graded_tokens(batch: int, tokens: int, dim: int) -> torch.Tensor:
    """Random tokens whose batch items range from near-duplicates to unrelated. Independent
    random tokens give near one-hot soft targets, which are symmetric and would hide a
    transposition or normalisation error in T^T; these give soft, asymmetric ones."""
    spread = torch.logspace(-2, 0, batch).view(batch, 1, 1)
    return torch.randn(1, tokens, dim) + spread * torch.randn(batch, tokens, dim)


def _value_and_grads(fn, loss: MSADLoss, z_a: torch.Tensor, z_b: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """``fn(loss, z_a, z_b)``, and the gradients of ``scale *`` it w.r.t. the inputs and every parameter."""
    loss.zero_grad()
    z_a, z_b = z_a.clone().requires_grad_(True), z_b.clone().requires_grad_(True)
    value = fn(loss, z_a, z_b)
    (scale * value).backward()
    grads = {name: p.grad.clone() for name, p in loss.named_parameters()}
    return {"value": value.detach(), "z_a": z_a.grad, "z_b": z_b.grad, **grads}


def batched(loss: MSADLoss, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    return loss(z_a, z_b, "a", "b")


def looped(loss: MSADLoss, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    return per_position_msad(loss, z_a, z_b, "a", "b")


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_batched_msad_equals_the_per_position_definition(setting: str, tokens: str) -> None:
    torch.manual_seed(0)
    loss = SETTINGS[setting]()
    loss.has_cls, loss.include_cls = TOKENS[tokens]
    loss.eval()  # no dropout, so both computations see the same projections
    z_a, z_b = graded_tokens(6, 17, 48), graded_tokens(6, 17, 48)
    assert torch.allclose(batched(loss, z_a, z_b), looped(loss, z_a, z_b), atol=1e-5, rtol=1e-5)
    # Gradients in float64: float32 rounding of the un-normalised settings' large logits would
    # blur a tight comparison.
    loss, z_a, z_b = loss.double(), z_a.double(), z_b.double()
    expected = _value_and_grads(looped, loss, z_a, z_b)
    got = _value_and_grads(batched, loss, z_a, z_b)
    for key, grad in expected.items():
        assert torch.allclose(got[key], grad, atol=1e-9, rtol=1e-7), key


def test_reference_setting_is_the_official_one() -> None:
    loss = MSADLoss.reference(8, ["a", "b"])
    assert float(loss.temperature) == 1.0 and not loss.normalize and loss.label_smoothing == 0.3
    assert loss.has_cls and loss.include_cls and loss.width == 1024
    assert not any(p is loss.log_tau for p in loss.parameters())  # tau is fixed


def test_learnable_temperature_is_clamped() -> None:
    loss = MSADLoss(8, ["a", "b"], temperature=0.07)
    assert float(loss.temperature.detach()) == pytest.approx(0.07)
    with torch.no_grad():
        loss.log_tau.fill_(-20.0)
    assert float(loss.temperature.detach()) == pytest.approx(0.01)
    with pytest.raises(InvalidOptionError, match="temperature") as info:
        MSADLoss(8, ["a", "b"], temperature=0.001)
    assert info.value.field == "temperature"


@pytest.mark.parametrize("setting", ["default", "reference"])
def test_gradient_reaches_encoder_heads_and_temperature(setting: str) -> None:
    torch.manual_seed(0)
    encoder = torch.nn.Linear(16, 48)
    loss = SETTINGS[setting]()
    x_a, x_b = torch.randn(4, 10, 16), torch.randn(4, 10, 16)
    loss(encoder(x_a), encoder(x_b), "a", "b").backward()
    named = [*encoder.named_parameters(), *loss.named_parameters()]
    assert (setting == "default") == any(name == "log_tau" for name, _ in named)
    for name, p in named:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sensor_heads_and_input_checks() -> None:
    loss = MSADLoss(8, ["a", "b"], width=8)
    with pytest.raises(InvalidOptionError, match="no projection head for sensor 'c'") as info:
        loss(torch.randn(2, 5, 8), torch.randn(2, 5, 8), "a", "c")
    assert info.value.field == "sensor"
    loss.add_sensor("c")
    assert torch.isfinite(loss(torch.randn(2, 5, 8), torch.randn(2, 5, 8), "a", "c"))
    with pytest.raises(InvalidOptionError, match="already has a projection head for sensor 'c'") as info:
        loss.add_sensor("c")
    assert info.value.field == "sensor"
    with pytest.raises(InvalidInputError, match=r"same batch and token grid.*a gives \(2, 5, 8\), b gives \(2, 9, 8\)") as info:
        loss(torch.randn(2, 5, 8), torch.randn(2, 9, 8), "a", "b")
    assert info.value.field == "z_b"
    with pytest.raises(TypeError, match="sequence of sensor names"):
        MSADLoss(8, "ab")


def test_bf16_autocast_keeps_the_contrastive_part_in_float32() -> None:
    torch.manual_seed(0)
    loss = MSADLoss(16, ["a", "b"], width=32).eval()
    z_a, z_b = torch.randn(8, 5, 16), torch.randn(8, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(z_a, z_b, "a", "b")
    assert mixed.dtype == torch.float32
    assert float(mixed.detach()) == pytest.approx(float(loss(z_a, z_b, "a", "b").detach()), rel=2e-2)


def _train_and_retrieve(shared_content: bool) -> tuple[list[float], float]:
    """Train two tiny encoders and the MSAD heads; return the loss curve and the top-1 accuracy
    of matching each held-out sensor-B token to its sensor-A partner (per position, B = 16)."""
    torch.manual_seed(0)
    mixing = torch.randn(16, 16)

    def pairs() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(16, 9, 16)
        # sensor B sees the same content through a different linear response, or other content
        y = x @ mixing if shared_content else torch.randn_like(x)
        return x, y + 0.05 * torch.randn_like(x)

    encoder_a, encoder_b = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32)
    loss = MSADLoss(32, ["a", "b"], width=32, dropout=0.0)
    optimizer = torch.optim.Adam([*encoder_a.parameters(), *encoder_b.parameters(), *loss.parameters()], lr=3e-3)
    values = []
    for _ in range(60):
        x, y = pairs()
        value = loss(encoder_a(x), encoder_b(y), "a", "b")
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(float(value.detach()))
    with torch.no_grad():
        x, y = pairs()
        e_a, e_b = loss.embed(encoder_a(x), "a"), loss.embed(encoder_b(y), "b")  # B x N x E
        best = torch.einsum("bne,cne->nbc", e_b, e_a).argmax(dim=-1)  # N x B
        accuracy = (best == torch.arange(16)).float().mean().item()
    return values, accuracy


def test_msad_aligns_pairs_that_share_content_and_only_those() -> None:
    values, accuracy = _train_and_retrieve(shared_content=True)
    assert sum(values[-5:]) / 5 < 0.7 * sum(values[:5]) / 5
    assert accuracy > 0.9
    _, unrelated_accuracy = _train_and_retrieve(shared_content=False)
    assert unrelated_accuracy < 0.25  # chance is 1/16


def test_dino_temperature_schedule_and_centre() -> None:
    dino = DINOLoss(out_dim=16, n_global=2, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_steps=10)
    assert [dino.teacher_temp_at(s) for s in (0, 5, 10, 100)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    torch.manual_seed(0)
    first, second = torch.randn(8, 16), torch.randn(8, 16) + 1
    dino(torch.randn(12, 16), first, 0)
    assert torch.allclose(dino.center, 0.1 * first.mean(0, keepdim=True), atol=1e-6)
    dino(torch.randn(12, 16), second, 1)
    expected = 0.9 * 0.1 * first.mean(0, keepdim=True) + 0.1 * second.mean(0, keepdim=True)
    assert torch.allclose(dino.center, expected, atol=1e-6)
    with pytest.raises(InvalidInputError, match="not 2 global views") as info:
        dino(torch.randn(12, 16), torch.randn(7, 16), 0)
    assert info.value.field == "teacher_out"


def test_dino_loss_pairs_views_and_trains() -> None:
    torch.manual_seed(0)
    # The definition for 2 global + 1 local view, written out: teacher view t vs student views s != t.
    student, teacher = torch.randn(12, 16), torch.randn(8, 16)
    log_p = [F.log_softmax(v / 0.1, dim=-1) for v in student.split(4)]
    p = [F.softmax(v / 0.04, dim=-1) for v in teacher.split(4)]
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    expected = sum(-(p[t] * log_p[s]).sum(-1).mean() for t, s in pairs) / len(pairs)
    assert torch.allclose(DINOLoss(out_dim=16)(student, teacher, 0), expected, atol=1e-5)

    head = DINOHead(8, 16, hidden_dim=32, bottleneck_dim=8)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    student_net, teacher_net = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    optimizer = torch.optim.Adam([*student_net.parameters(), *head.parameters()], lr=1e-2)
    dino = DINOLoss(out_dim=16)
    x = torch.randn(4, 8)
    views = torch.cat([x + 0.01 * torch.randn_like(x) for _ in range(3)])
    values = []
    for step in range(40):
        with torch.no_grad():
            target = head(teacher_net(views[:8]))
        value = dino(head(student_net(views)), target, step)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(float(value.detach()))
    assert torch.isfinite(torch.tensor(values)).all() and values[-1] < 0.7 * values[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, inputs: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    half = len(inputs["z_a"]) // 2
    mine = slice(rank * half, (rank + 1) * half)
    results = {}
    for name, state in inputs["states"].items():
        loss = SETTINGS[name]().eval()
        loss.load_state_dict(state)
        # The trainer averages gradients over ranks, so the objective is the mean of the ranks' losses.
        results[name] = _value_and_grads(batched, loss, inputs["z_a"][mine], inputs["z_b"][mine], scale=0.5)
    dino = DINOLoss(out_dim=16)
    dino(torch.randn(12, 16), inputs["teacher"][rank], 0)
    results["center"] = dino.center
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_negatives_gathered_across_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    z_a, z_b = graded_tokens(8, 5, 48), graded_tokens(8, 5, 48)
    losses = {name: SETTINGS[name]().eval() for name in ("default", "reference")}
    teacher = torch.randn(2, 8, 16)
    inputs = {"z_a": z_a, "z_b": z_b, "states": {n: l.state_dict() for n, l in losses.items()}, "teacher": teacher}
    mp.spawn(_rank_worker, args=(_free_port(), inputs, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, loss in losses.items():
        expected = _value_and_grads(batched, loss, z_a, z_b)
        got = [r[name] for r in ranks]
        assert float(got[0]["value"] + got[1]["value"]) / 2 == pytest.approx(float(expected["value"]), abs=1e-5), name
        assert not torch.allclose(got[0]["value"], got[1]["value"])  # each rank scored its own rows
        for key in ("z_a", "z_b"):
            assert torch.allclose(torch.cat([g[key] for g in got]), expected[key], atol=1e-6), (name, key)
        for key, grad in expected.items():
            if key not in ("value", "z_a", "z_b"):  # parameter gradients, summed as DDP would average
                assert torch.allclose(got[0][key] + got[1][key], grad, atol=1e-5), (name, key)
    for r in ranks:
        assert torch.allclose(r["center"], 0.1 * teacher.reshape(16, 16).mean(0, keepdim=True), atol=1e-6)


def test_masked_token_loss_weighs_each_image_once_and_centres_the_teacher() -> None:
    """iBOT's loss: per image the mean cross-entropy over its masked tokens, then the mean over
    images (an image with 3 masked tokens counts as much as one with 1); the teacher is centred
    and sharpened like DINO's, with its own centre."""
    torch.manual_seed(0)
    loss = MaskedTokenLoss(5, student_temp=0.1, teacher_temp=0.05)
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    image = torch.tensor([0, 0, 0, 2])
    log_p = (student / 0.1).log_softmax(-1)
    p_t = (teacher / 0.05).softmax(-1)  # centre 0 before the first call
    ce = -(p_t * log_p).sum(-1)
    expected = (ce[:3].mean() + ce[3]) / 2
    assert torch.allclose(loss(student, teacher, image, step=0), expected)
    assert torch.allclose(loss.center, 0.1 * teacher.mean(0, keepdim=True))
    # A student that gives the teacher's sharpened distribution scores less than a shuffled one.
    matched = MaskedTokenLoss(5, student_temp=0.05, teacher_temp=0.05)
    shuffled = MaskedTokenLoss(5, student_temp=0.05, teacher_temp=0.05)
    assert matched(teacher, teacher, image, 0) < shuffled(teacher.roll(1, dims=1), teacher, image, 0)
    with pytest.raises(InvalidInputError, match="same M masked tokens") as info:
        loss(student, teacher[:3], image, 0)
    assert info.value.field == "teacher_out"


def test_random_patch_mask_draws_the_asked_fraction() -> None:
    torch.manual_seed(0)
    mask = random_patch_mask(2000, 64, (0.1, 0.5))
    counts = mask.sum(1).float()
    assert counts.min() >= round(0.1 * 64) and counts.max() <= round(0.5 * 64)
    assert abs(counts.mean() - 0.3 * 64) < 1.0
    # Every position is masked about as often as any other (no block of the grid favoured).
    per_position = mask.float().mean(0)
    assert per_position.min() > 0.25 and per_position.max() < 0.35
    with pytest.raises(InvalidOptionError, match="0 < low <= high < 1") as info:
        random_patch_mask(2, 64, (0.0, 0.5))
    assert info.value.field == "ratio"
