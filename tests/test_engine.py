"""q2l.training.engine: one training pass and one evaluation pass, on a tiny linear model and
synthetic batches."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from q2l.training.engine import NonFiniteError, StepOptions, TrainState, evaluate, train_one_epoch

CPU = torch.device("cpu")
K = 3  # classes


def _model(seed: int = 0) -> nn.Module:
    """(B, 2, 2, 2) images -> (B, K) logits, no batch statistics."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(8, K))


def _state(model: nn.Module, scaler_enabled: bool = False) -> TrainState:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return TrainState(
        model=model,
        loss=nn.BCEWithLogitsLoss(),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=scaler_enabled),
    )


def _batches(count: int, size: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(size, 2, 2, 2, generator=generator),
            (torch.rand(size, K, generator=generator) > 0.5).float(),
        )
        for _ in range(count)
    ]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[key], b[key]) for key in a)


# ---- train_one_epoch ----


def test_one_pass_changes_the_weights_and_reports_each_steps_mean_loss():
    model, batches = _model(), _batches(5)
    start = copy.deepcopy(model)
    state, reported = _state(model), []
    consumed = train_one_epoch(
        state,
        batches,
        StepOptions(CPU, accumulate=2),
        on_step=lambda loss, skipped, taken: reported.append((float(loss), skipped, taken)),
    )
    assert consumed == 5 and state.step == 3  # steps of 2, 2 and the last batch alone
    assert [taken for _, _, taken in reported] == [2, 2, 1]
    assert not any(skipped for _, skipped, _ in reported)
    assert not _same(_weights(model), _weights(start))
    # The first step's loss: the mean over its two batches, at the starting weights.
    with torch.no_grad():
        first = [
            nn.functional.binary_cross_entropy_with_logits(start(x), y) for x, y in batches[:2]
        ]
    assert reported[0][0] == pytest.approx(float(sum(first) / 2), rel=1e-6)
    assert model.training


def test_on_step_returning_true_ends_the_pass():
    state = _state(_model())
    consumed = train_one_epoch(
        state, _batches(5), StepOptions(CPU), on_step=lambda loss, skipped, taken: state.step == 2
    )
    assert consumed == 2 and state.step == 2


def test_train_one_epoch_applies_the_batch_transform():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    loader = [(torch.rand(4, 3, 4, 4), torch.tensor([[1.0, 0.0]] * 4)) for _ in range(3)]
    seen = []

    def batch_transform(images, targets):
        seen.append(targets.shape)
        return images, targets * 0.5

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState(
        model,
        torch.nn.BCEWithLogitsLoss(),
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        torch.amp.GradScaler("cpu", enabled=False),
    )
    losses = []
    steps = train_one_epoch(
        state,
        loader,
        StepOptions(torch.device("cpu"), batch_transform=batch_transform),
        on_step=lambda loss, skipped, batches: losses.append(float(loss)) or False,
    )
    assert seen == [(4, 2)] * 3 and steps == 3 == state.step and np.isfinite(losses).all()


def test_accumulated_batches_take_the_step_of_one_large_batch():
    torch.manual_seed(0)
    images, targets = torch.randn(8, 3, 4, 4), (torch.rand(8, 5) > 0.5).float()

    def one_step(accumulate: int, batches: list) -> dict:
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(48, 5)
        )  # no batch statistics
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        loss = torch.nn.BCEWithLogitsLoss()  # a mean over the batch, like q2l's batchmean
        state = TrainState(
            model, loss, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)
        )
        train_one_epoch(state, batches, StepOptions(torch.device("cpu"), accumulate=accumulate))
        assert state.step == 1
        return model.state_dict()

    big = one_step(1, [(images, targets)])
    accumulated = one_step(4, [(images[i : i + 2], targets[i : i + 2]) for i in range(0, 8, 2)])
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-6, atol=1e-6)


def test_gradients_are_clipped_to_the_norm_given():
    model = _model()
    train_one_epoch(_state(model), _batches(1), StepOptions(CPU, grad_clip_norm=1e-3))
    norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float(norm) == pytest.approx(1e-3, rel=1e-4)


def test_the_ema_follows_the_weights():
    from timm.utils import ModelEmaV3

    model = _model()
    state = _state(model)
    state.ema = ModelEmaV3(model, decay=0.5)
    before = _weights(state.ema.module)
    train_one_epoch(state, _batches(1), StepOptions(CPU))
    # timm's EMA copies the weights over its first steps (decay 0), then averages.
    assert _same(_weights(state.ema.module), _weights(model))
    train_one_epoch(state, _batches(3, seed=2), StepOptions(CPU))
    after = _weights(state.ema.module)
    assert not _same(after, before) and not _same(after, _weights(model))


# ---- non-finite losses and gradients ----


class _NanAt(nn.Module):
    """BCE, made NaN at its `call`-th call."""

    def __init__(self, call: int) -> None:
        super().__init__()
        self.call, self.calls = call, 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = nn.functional.binary_cross_entropy_with_logits(logits, targets)
        return loss * float("nan") if self.calls == self.call else loss


def test_a_nan_loss_stops_before_the_optimizer_step_with_the_weights_unchanged():
    model = _model()
    state = _state(model)
    state.loss = _NanAt(call=2)
    train_one_epoch(state, _batches(1), StepOptions(CPU))  # step 1: a finite loss
    after_step_1 = _weights(model)
    with pytest.raises(NonFiniteError, match=r"loss is not finite at step 2 \(nan\)"):
        train_one_epoch(state, _batches(1, seed=2), StepOptions(CPU))
    assert state.loss.calls == 2  # the NaN loss was reached
    assert state.step == 1 and _same(_weights(model), after_step_1)


def test_a_loss_another_process_finds_non_finite_stops_this_one_too():
    state = _state(_model())
    options = StepOptions(CPU, is_finite=lambda loss: False)  # dist.any_rank's answer
    with pytest.raises(NonFiniteError, match="at step 1 on another process"):
        train_one_epoch(state, _batches(1), options)


def _infinite_gradient(model: nn.Module) -> None:
    """The loss stays finite; the first layer's weight gradient becomes inf."""
    model[1].weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))


def test_an_infinite_gradient_stops_before_the_optimizer_step():
    model = _model()
    start = _weights(model)
    _infinite_gradient(model)
    state = _state(model)
    with pytest.raises(NonFiniteError, match=r"gradient norm is inf at step 1 \(loss [0-9.]+\)"):
        train_one_epoch(state, _batches(1), StepOptions(CPU))
    assert state.step == 0 and _same(_weights(model), start)


def test_without_the_check_a_non_finite_step_is_taken():
    model = _model()
    _infinite_gradient(model)
    state = _state(model)
    train_one_epoch(state, _batches(1), StepOptions(CPU, check_finite=False))
    assert state.step == 1 and not torch.isfinite(model[1].weight).all()


# A skipped first step makes torch warn that the schedule stepped before the optimizer: it did.
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")
def test_under_fp16_the_scaler_skips_an_infinite_gradient_and_on_step_is_told():
    model = _model()
    start = _weights(model)
    _infinite_gradient(model)
    state = _state(model, scaler_enabled=True)
    scale = state.scaler.get_scale()
    reported = []
    train_one_epoch(
        state,
        _batches(1),
        StepOptions(CPU, precision="fp16"),
        on_step=lambda loss, skipped, taken: reported.append((bool(torch.isfinite(loss)), skipped)),
    )
    assert reported == [(True, True)]  # a finite loss, the update skipped
    assert _same(_weights(model), start) and state.scaler.get_scale() < scale


# ---- evaluate ----


def test_evaluate_returns_probabilities_and_targets_in_batch_order():
    model, batches = _model(), _batches(3, size=5)
    model.train()
    outcome = evaluate(model, batches, StepOptions(CPU))
    assert outcome is not None
    scores, targets = outcome
    images = torch.cat([x for x, _ in batches])
    with torch.no_grad():
        expected = torch.sigmoid(model(images))
    assert scores.shape == targets.shape == (15, K)
    assert scores.dtype == targets.dtype == torch.float32
    torch.testing.assert_close(scores, expected)
    assert torch.equal(targets, torch.cat([y for _, y in batches]))
    assert not model.training


def test_evaluate_stopped_early_returns_none():
    polled = []
    outcome = evaluate(
        _model(), _batches(3), StepOptions(CPU), should_stop=lambda: polled.append(1) or True
    )
    assert outcome is None and polled == [1]  # stopped after the first batch
