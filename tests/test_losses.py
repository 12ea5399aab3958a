"""q2l.losses: ASL against BCE and its written-out formula, fp32 safety, partial labels, BCE."""

import pytest
import torch
from torch.nn import functional as F

from q2l.losses import AsymmetricLoss, BCEWithLogitsLoss, PartialAsymmetricLoss

B, K = 6, 10


def _batch(seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits (B, K) and binary targets (B, K)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, generator=generator) * scale
    targets = (torch.rand(B, K, generator=generator) < 0.3).float()
    return logits, targets


def _partial_targets(targets: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Mark about 40% of the entries of binary targets (B, K) as unannotated (-1)."""
    generator = torch.Generator().manual_seed(seed)
    return targets.masked_fill(torch.rand(targets.shape, generator=generator) < 0.4, -1.0)


def _asl_by_formula(logits, targets, gamma_neg, gamma_pos, clip, eps=1e-8):
    """ASL written out from the paper, elementwise (B, K), without any of the module's helpers."""
    p = torch.sigmoid(logits)
    p_m = torch.clamp(p - clip, min=0.0)
    positive_term = targets * (1 - p) ** gamma_pos * torch.log(torch.clamp(p, min=eps))
    negative_term = (1 - targets) * p_m**gamma_neg * torch.log(torch.clamp(1 - p_m, min=eps))
    return -(positive_term + negative_term)


# ---- AsymmetricLoss ----


def test_asl_without_focusing_or_clip_is_bce():
    logits, targets = _batch()
    loss = AsymmetricLoss(gamma_neg=0.0, gamma_pos=0.0, clip=0.0, reduction="sum")(logits, targets)
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
    torch.testing.assert_close(loss, expected)


def test_asl_matches_paper_formula():
    logits, targets = _batch()
    loss = AsymmetricLoss(gamma_neg=4.0, gamma_pos=1.0, clip=0.05, reduction="sum")(logits, targets)
    expected = _asl_by_formula(logits, targets, gamma_neg=4.0, gamma_pos=1.0, clip=0.05).sum()
    torch.testing.assert_close(loss, expected)


def test_reductions_are_consistent():
    logits, targets = _batch()
    losses = {
        name: AsymmetricLoss(reduction=name)(logits, targets)
        for name in ("sum", "batchmean", "mean")
    }
    torch.testing.assert_close(losses["sum"], losses["batchmean"] * B)
    torch.testing.assert_close(losses["sum"], losses["mean"] * B * K)


def _asl_grad(logits, targets, disable_focal_grad):
    logits = logits.clone().requires_grad_(True)
    loss = AsymmetricLoss(
        gamma_neg=4.0,
        gamma_pos=1.0,
        clip=0.05,
        disable_focal_grad=disable_focal_grad,
        reduction="sum",
    )(logits, targets)
    loss.backward()
    return logits.grad


def test_disable_focal_grad_changes_gradient_and_enabled_matches_autograd():
    logits, targets = _batch()
    grad_detached = _asl_grad(logits, targets, disable_focal_grad=True)
    grad_full = _asl_grad(logits, targets, disable_focal_grad=False)
    assert not torch.allclose(grad_detached, grad_full)

    reference = logits.clone().requires_grad_(True)
    _asl_by_formula(reference, targets, gamma_neg=4.0, gamma_pos=1.0, clip=0.05).sum().backward()
    torch.testing.assert_close(grad_full, reference.grad)
    assert torch.isfinite(grad_detached).all() and torch.isfinite(grad_full).all()


def test_fp16_extreme_logits_give_fp32_result():
    # The failure this guards against: eps=1e-8 does not exist in float16.
    assert torch.tensor(1e-8, dtype=torch.float16).item() == 0.0
    logits = torch.tensor([[60.0, -60.0, 60.0, -60.0], [-60.0, 60.0, 0.5, -0.5]])
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    criterion = AsymmetricLoss()
    loss_fp16 = criterion(logits.half(), targets.half())
    loss_fp32 = criterion(logits, targets)
    assert loss_fp16.dtype == torch.float32
    assert torch.isfinite(loss_fp16)
    assert abs(loss_fp16.item() - loss_fp32.item()) < 1e-3


def test_losses_stay_float32_inside_bf16_autocast():
    logits, targets = _batch()
    partial_targets = _partial_targets(targets)
    criteria = [
        (AsymmetricLoss(), targets),
        (PartialAsymmetricLoss(mode="selective"), partial_targets),
        (BCEWithLogitsLoss(), partial_targets),
    ]
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        for criterion, criterion_targets in criteria:
            loss = criterion(logits.bfloat16(), criterion_targets)
            assert loss.dtype == torch.float32
            assert torch.isfinite(loss)


@pytest.mark.parametrize("disable_focal_grad", [True, False])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 4.0])
def test_gradients_finite_at_saturated_logits(gamma, disable_focal_grad):
    logits = torch.tensor([[40.0, -40.0, 0.0, 1e-3], [-40.0, 40.0, -1.0, 2.0]], requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    loss = AsymmetricLoss(
        gamma_neg=gamma, gamma_pos=gamma, clip=0.05, disable_focal_grad=disable_focal_grad
    )(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


# ---- PartialAsymmetricLoss ----


def test_partial_ignore_skips_unannotated_entries():
    logits, targets = _batch()
    partial = _partial_targets(targets)
    unannotated = partial == -1
    criterion = PartialAsymmetricLoss(
        gamma_neg=4.0, gamma_pos=1.0, clip=0.05, mode="ignore", reduction="sum"
    )
    loss = criterion(logits, partial)

    perturbed = logits.masked_fill(unannotated, 25.0)
    torch.testing.assert_close(criterion(perturbed, partial), loss)
    expected = _asl_by_formula(logits, targets, gamma_neg=4.0, gamma_pos=1.0, clip=0.05)[
        ~unannotated
    ].sum()
    torch.testing.assert_close(loss, expected)


def test_partial_negative_equals_asl_with_unannotated_as_negative():
    logits, targets = _batch()
    partial = _partial_targets(targets)
    loss = PartialAsymmetricLoss(
        gamma_neg=3.0,
        gamma_pos=1.0,
        gamma_unann=3.0,
        alpha_neg=1.0,
        alpha_unann=1.0,
        clip=0.05,
        mode="negative",
    )(logits, partial)
    expected = AsymmetricLoss(gamma_neg=3.0, gamma_pos=1.0, clip=0.05)(
        logits, partial.clamp(min=0.0)
    )
    torch.testing.assert_close(loss, expected)


def test_partial_selective_ignores_topk_and_high_prior_classes():
    logits, targets = _batch()
    partial = _partial_targets(targets)
    unannotated = partial == -1
    priors = [0.01] * K
    priors[2] = priors[7] = 0.5
    criterion = PartialAsymmetricLoss(
        gamma_neg=2.0,
        gamma_unann=2.0,
        mode="selective",
        likelihood_topk=1,
        prior_threshold=0.05,
        class_priors=priors,
        reduction="sum",
    )
    loss = criterion(logits, partial)

    # Expected ignore set, built independently: the B likeliest unannotated entries, plus classes 2
    # and 7.
    flat_indices = unannotated.flatten().nonzero().squeeze(1)
    likeliest = flat_indices[logits.flatten()[flat_indices].argsort(descending=True)[:B]]
    top_k = torch.zeros(B * K, dtype=torch.bool)
    top_k[likeliest] = True
    top_k = top_k.view(B, K)
    high_prior = torch.zeros(B, K, dtype=torch.bool)
    high_prior[:, [2, 7]] = unannotated[:, [2, 7]]
    ignored = top_k | high_prior
    assert (high_prior & ~top_k).any() and (top_k & ~high_prior).any()  # both rules are exercised

    elementwise = _asl_by_formula(
        logits, partial.clamp(min=0.0), gamma_neg=2.0, gamma_pos=0.0, clip=0.0
    )
    torch.testing.assert_close(loss, elementwise[~ignored].sum())

    # Moving ignored logits in a direction that keeps the ignore set (top-k up, the rest down)
    # leaves the loss.
    logits_ignored_changed = logits.masked_fill(top_k, 30.0).masked_fill(ignored & ~top_k, -30.0)
    torch.testing.assert_close(criterion(logits_ignored_changed, partial), loss)


def test_partial_selective_topk_never_drops_annotated_entries():
    # k = 100 * B exceeds the number of unannotated entries, so selective must reduce to ignore.
    logits, targets = _batch()
    partial = _partial_targets(targets)
    selective = PartialAsymmetricLoss(mode="selective", likelihood_topk=100, prior_threshold=None)
    torch.testing.assert_close(
        selective(logits, partial), PartialAsymmetricLoss(mode="ignore")(logits, partial)
    )


def test_partial_online_priors_update_in_train_mode_only():
    logits, targets = _batch()
    partial = _partial_targets(targets)
    criterion = PartialAsymmetricLoss(mode="selective", prior_momentum=0.5)
    assert criterion.class_priors.numel() == 0

    criterion.eval()
    criterion(logits, partial)
    assert criterion.class_priors.numel() == 0

    criterion.train()
    criterion(logits, partial)
    batch_mean = torch.sigmoid(logits).mean(dim=0)
    torch.testing.assert_close(
        criterion.class_priors, batch_mean
    )  # the first batch seeds the average
    criterion(torch.zeros(B, K), partial)
    torch.testing.assert_close(criterion.class_priors, 0.5 * batch_mean + 0.5 * 0.5)
    assert not criterion.class_priors.requires_grad

    frozen = criterion.class_priors.clone()
    criterion.eval()
    criterion(torch.full((B, K), 5.0), partial)
    torch.testing.assert_close(criterion.class_priors, frozen)

    state = criterion.state_dict()
    torch.testing.assert_close(state["class_priors"], frozen)
    restored = PartialAsymmetricLoss(mode="selective")
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.class_priors, frozen)


def test_partial_fixed_priors_are_not_updated():
    logits, targets = _batch()
    criterion = PartialAsymmetricLoss(mode="selective", class_priors=[0.1] * K)
    criterion(logits, _partial_targets(targets))
    torch.testing.assert_close(criterion.class_priors, torch.full((K,), 0.1))


def test_partial_gradients_finite():
    logits, targets = _batch(scale=20.0)
    logits.requires_grad_(True)
    for mode in ("negative", "ignore", "selective"):
        loss = PartialAsymmetricLoss(mode=mode, clip=0.05, disable_focal_grad=False)(
            logits, _partial_targets(targets)
        )
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


# ---- BCEWithLogitsLoss ----


def test_bce_matches_torch_and_ignores_unannotated():
    logits, targets = _batch()
    torch.testing.assert_close(
        BCEWithLogitsLoss(reduction="mean")(logits, targets),
        F.binary_cross_entropy_with_logits(logits, targets),
    )

    partial = _partial_targets(targets)
    annotated = partial != -1
    loss = BCEWithLogitsLoss(reduction="sum")(logits, partial)
    expected = F.binary_cross_entropy_with_logits(
        logits[annotated], targets[annotated], reduction="sum"
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(
        BCEWithLogitsLoss(reduction="sum")(logits.masked_fill(~annotated, 9.0), partial), loss
    )
    torch.testing.assert_close(BCEWithLogitsLoss()(logits, partial), loss / B)


# ---- argument checks ----


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: AsymmetricLoss(gamma_neg=-1.0), "gamma_neg"),
        (lambda: AsymmetricLoss(gamma_pos=-0.5), "gamma_pos"),
        (lambda: AsymmetricLoss(clip=1.0), "clip"),
        (lambda: AsymmetricLoss(clip=-0.1), "clip"),
        (lambda: AsymmetricLoss(reduction="avg"), "'avg'"),
        (lambda: BCEWithLogitsLoss(reduction="none"), "'none'"),
        (lambda: PartialAsymmetricLoss(mode="selctive"), "'negative', 'ignore', 'selective'"),
        (lambda: PartialAsymmetricLoss(gamma_unann=-2.0), "gamma_unann"),
        (lambda: PartialAsymmetricLoss(alpha_pos=-1.0), "alpha_pos"),
        (lambda: PartialAsymmetricLoss(likelihood_topk=-1), "likelihood_topk"),
        (lambda: PartialAsymmetricLoss(prior_momentum=1.5), "prior_momentum"),
        (lambda: PartialAsymmetricLoss(prior_threshold=2.0), "prior_threshold"),
        (lambda: PartialAsymmetricLoss(class_priors=[0.2, 1.5]), "class_priors"),
    ],
)
def test_bad_arguments_raise(factory, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        factory()


def test_mismatched_shapes_and_prior_length_raise():
    logits, targets = _batch()
    with pytest.raises(ValueError, match="same shape"):
        AsymmetricLoss()(logits, targets[:, :-1])
    with pytest.raises(ValueError, match="class_priors has 3 classes"):
        PartialAsymmetricLoss(mode="selective", class_priors=[0.1, 0.2, 0.3])(
            logits, _partial_targets(targets)
        )
