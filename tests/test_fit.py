"""The one training loop (training.fit.Loop): transformers' schedule, early stop, resumable position,
and no other loop in the package."""

from pathlib import Path

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from adapterkit.training.fit import Loop, Position, Schedule

from conftest import source_lines

SRC = Path(__file__).parents[1] / "src" / "adapterkit"


def toy(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 1), torch.randn(40, 3), torch.randn(40, 1)


def test_the_schedule_is_transformers_linear_warmup_and_decay():
    model, x, y = toy()
    loop = Loop(model.parameters(), Schedule(lr=0.1, steps=20, warmup=0.1, max_grad_norm=None))
    reference = torch.optim.AdamW(torch.nn.Linear(3, 1).parameters(), lr=0.1)
    expected = get_linear_schedule_with_warmup(reference, 2, 20)
    rates = []
    loop.run(lambda e: [slice(i, i + 10) for i in range(0, 40, 10)],
             lambda s: torch.nn.functional.mse_loss(model(x[s]), y[s]),
             on_step=lambda *a: rates.append(loop.scheduler.get_last_lr()[0]), show=False)  # fmt: skip
    for _ in range(20):
        reference.step()
        expected.step()
        assert rates.pop(0) == pytest.approx(expected.get_last_lr()[0])
    assert loop.position == Position(step=20, epoch=5, batch=0)


class Killed(Exception):
    pass


def test_a_run_continues_from_its_position():
    """A loop interrupted after step 7 (mid-epoch) and run again ends where an uninterrupted one does."""

    def train(kill_at: int | None) -> torch.Tensor:
        model, x, y = toy()
        loop = Loop(model.parameters(), Schedule(lr=0.05, steps=12))

        def batches(epoch):
            return [slice(i, i + 8) for i in range(0, 40, 8)]

        def loss(rows):
            return torch.nn.functional.mse_loss(model(x[rows]), y[rows])

        def on_step(*args):
            if loop.position.step == kill_at:
                raise Killed

        if kill_at:
            with pytest.raises(Killed):
                loop.run(batches, loss, on_step, show=False)
            assert loop.position == Position(step=7, epoch=1, batch=2)
        loop.run(batches, loss, show=False)
        return model.weight.detach().clone()

    assert torch.equal(train(None), train(7))


def test_on_epoch_can_stop_early():
    model, x, y = toy()
    loop = Loop(model.parameters(), Schedule(lr=0.01, steps=100))
    seen = []
    loop.run(lambda e: [slice(0, 20), slice(20, 40)], lambda s: model(x[s]).pow(2).mean(),
             on_epoch=lambda epoch: seen.append(epoch) or epoch == 2, show=False)  # fmt: skip
    assert seen == [0, 1, 2] and loop.position.step == 6


def test_one_loop_in_the_package():
    """Optimizers are built and stepped in training/fit.py alone (the CLI, demos and speech demo use it)."""
    assert (
        source_lines(r"torch\.optim\.[\w.]+\(|\.backward\(|LambdaLR|get_linear_schedule", lambda p: p.name == "fit.py")
        == []
    )
