"""The shared training loop: LR schedule, EMA math, loss goes down, kill-and-resume, 2-process DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from nanodiffusion.train.data import batch_indices
from nanodiffusion.train.ema import EMA, ema_decay
from nanodiffusion.train.loop import TrainConfig, last_checkpoint, train
from nanodiffusion.train.lr import lr_factor


class Regression(nn.Module):
    """A tiny objective: fit y = x @ w_true with an MLP; noise drawn in forward like the real objectives."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 1))

    def forward(self, batch):
        x = batch["x"] + 0.01 * torch.randn_like(batch["x"])
        loss = (self.net(x).squeeze(-1) - batch["y"]).pow(2).mean()
        return loss, {"abs": loss.detach().sqrt()}


def regression_batches(step: int, micro: int, rank: int, world: int):
    g = torch.Generator().manual_seed(int(batch_indices(10**6, 1, 0, step, micro, rank)))
    x = torch.randn(16, 4, generator=g)
    return {"x": x, "y": x @ torch.tensor([0.5, -0.3, 0.2, 0.4])}


def run(output: Path, steps: int, **overrides) -> nn.Module:
    torch.manual_seed(0)
    config = TrainConfig(output=output, steps=steps, batch_size=16, lr=1e-2, warmup=2, log_every=1,
                         checkpoint_every=overrides.pop("checkpoint_every", 3), preview_every=10**9, **overrides)
    return train(Regression(), regression_batches, config)


def test_lr_warmup_then_cosine():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    middle = 10 + 45
    assert lr_factor(middle, 10, 100, min_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, 100, min_ratio=0.2) == pytest.approx(0.2)
    values = [lr_factor(s, 10, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_ema_update_math():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    d = ema_decay(0, 0.9)
    assert d == pytest.approx(0.1)
    for name, p in model.named_parameters():
        expected = d * start[name] + (1 - d) * p
        torch.testing.assert_close(ema.model.state_dict()[name], expected)
    ema.step = 1000
    assert ema_decay(ema.step, 0.9) == 0.9
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_loss_goes_down(tmp_path):
    run(tmp_path, steps=30)
    lines = (tmp_path / "log.csv").read_text().splitlines()
    header = lines[0].split(",")
    losses = [float(line.split(",")[header.index("loss")]) for line in lines[1:]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5


def test_stages_with_different_mixed_precision_run_in_one_process(tmp_path):
    """`nanodiff train builtin train` runs the bf16 VAE stage, then the fp32 diffusion stage, in one process."""
    run(tmp_path / "bf16", steps=2, mixed_precision="bf16")
    run(tmp_path / "fp32", steps=2, mixed_precision="no")
    assert last_checkpoint(tmp_path / "fp32") is not None


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    straight = run(tmp_path / "straight", steps=8)

    def killed_batches(step, micro, rank, world):
        if step == 5:
            raise KeyboardInterrupt  # killed after the checkpoint at step 3, mid-way through step 5
        return regression_batches(step, micro, rank, world)

    torch.manual_seed(0)
    config = TrainConfig(output=tmp_path / "resumed", steps=8, batch_size=16, lr=1e-2, warmup=2, log_every=1,
                         checkpoint_every=3, preview_every=10**9)
    with pytest.raises(KeyboardInterrupt):
        train(Regression(), killed_batches, config)
    assert last_checkpoint(tmp_path / "resumed").name == "step-0000003"
    resumed = run(tmp_path / "resumed", steps=8)
    logged = [int(line.split(",")[0]) for line in (tmp_path / "resumed" / "log.csv").read_text().splitlines()[1:]]
    assert logged == list(range(1, 9))  # rows of the killed run after its checkpoint are not repeated
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    opt_a = torch.load(last_checkpoint(tmp_path / "straight") / "optimizer.bin", weights_only=False)
    opt_b = torch.load(last_checkpoint(tmp_path / "resumed") / "optimizer.bin", weights_only=False)
    for key, state in opt_a["state"].items():
        torch.testing.assert_close(state["exp_avg_sq"], opt_b["state"][key]["exp_avg_sq"], rtol=0, atol=0)


def test_checkpoints_are_pruned_and_temporaries_ignored(tmp_path):
    run(tmp_path, steps=9, checkpoint_every=2, keep_checkpoints=2)
    (tmp_path / "checkpoints" / ".tmp-step-0000010").mkdir()
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert names == ["step-0000008", "step-0000009"]
    assert last_checkpoint(tmp_path).name == "step-0000009"


def _ddp_worker(output: str) -> None:
    """Run by `accelerate launch`: 4 steps of DDP, then each process saves its own weights."""
    from accelerate import PartialState

    model = run(Path(output), steps=4, threads=1)
    torch.save(model.state_dict(), Path(output) / f"rank{PartialState().process_index}.pt")


def test_two_process_ddp_ends_with_identical_weights(tmp_path):
    # torchrun-style launch (--multi_gpu) + ACCELERATE_USE_CPU: two CPU processes, DDP over gloo
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               __file__, str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    torch.manual_seed(0)
    init = Regression().state_dict()
    assert any(not torch.equal(init[key], a[key]) for key in a)


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
