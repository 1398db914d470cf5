"""The shared training loop: LR schedule, EMA math, loss goes down, kill-and-resume, 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from safetensors.torch import load_file

from nanodiffusion.errors import NanoDiffusionError
from nanodiffusion.train.data import batch_indices
from nanodiffusion.train.ema import EMA, ema_decay
from nanodiffusion.train.loop import TrainConfig, last_checkpoint, train
from nanodiffusion.train.lr import lr_factor
from nanodiffusion.train.state import STATE_FILE, TENSORS_FILE
from serving import free_port


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
    """Two runs with different mixed precision in one process (as the bf16 VAE stage and the fp32 diffusion stage of
    `nanodiff train builtin train` are; the command itself: test_train_builtin.py)."""
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
    opt_a, opt_b = (load_file(last_checkpoint(tmp_path / name) / TENSORS_FILE) for name in ("straight", "resumed"))
    second_moments = [key for key in opt_a if key.endswith(".exp_avg_sq")]
    assert second_moments and all(key.startswith(".optimizer.") for key in second_moments)
    for key in second_moments:
        torch.testing.assert_close(opt_a[key], opt_b[key], rtol=0, atol=0)


class RunsCode:
    """A pickle that creates `marker` when unpickled (what a crafted run folder would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_resume_never_unpickles_a_tampered_run_folder(tmp_path):
    run(tmp_path / "run", steps=3)
    checkpoint = last_checkpoint(tmp_path / "run")
    marker = tmp_path / "code-ran"
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin"):
        torch.save(RunsCode(marker), checkpoint / name)
    resumed = run(tmp_path / "run", steps=4)  # resumes from its safetensors + JSON, ignoring the pickles
    assert not marker.exists()
    assert last_checkpoint(tmp_path / "run").name == "step-0000004"
    assert all(torch.isfinite(p).all() for p in resumed.parameters())

    legacy = tmp_path / "legacy" / "checkpoints" / "step-0000003"  # an accelerate-style folder: pickles only
    legacy.mkdir(parents=True)
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        torch.save(RunsCode(marker), legacy / name)
    with pytest.raises(NanoDiffusionError, match="pickle files .* can run code and are not read"):
        run(tmp_path / "legacy", steps=4)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["json", "tensors", "structure", "model"])
def test_a_damaged_checkpoint_is_refused_with_one_line(tmp_path, damage):
    run(tmp_path, steps=3)
    checkpoint = last_checkpoint(tmp_path)
    if damage == "json":
        (checkpoint / STATE_FILE).write_text('{"optimizer": ')
    elif damage == "tensors":
        (checkpoint / TENSORS_FILE).write_bytes((checkpoint / TENSORS_FILE).read_bytes()[:100])
    elif damage == "structure":
        (checkpoint / STATE_FILE).write_text(json.dumps({"optimizer": {"$tensor": "nope"}, "ema": [], "progress": 1}))
    else:
        (checkpoint / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(NanoDiffusionError, match="cannot resume from .*step-0000003") as error:
        run(tmp_path, steps=4)
    assert "\n" not in str(error.value)


def test_an_unreadable_rng_state_is_a_warning_and_the_run_goes_on(tmp_path):
    run(tmp_path, steps=3)
    (last_checkpoint(tmp_path) / "rng-0.json").write_text("not json")
    with pytest.warns(UserWarning, match="could not restore the random state"):
        run(tmp_path, steps=4)
    assert last_checkpoint(tmp_path).name == "step-0000004"


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("checkpoint_every", 0), ("log_every", 0),
                                          ("grad_accum", 0), ("lr", float("nan")), ("lr", float("inf")),
                                          ("steps", 0), ("ema_decay", float("nan"))])
def test_settings_that_break_a_run_are_refused_before_it_starts(tmp_path, field, value):
    with pytest.raises(NanoDiffusionError, match="is not allowed"):
        TrainConfig(output=tmp_path, **{field: value})
    assert not (tmp_path / "checkpoints").exists()


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
               "--main_process_port", str(free_port()), __file__, str(tmp_path)]
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
