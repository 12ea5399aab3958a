"""Every optimised path against the plain one: the fast AP against sklearn on a COCO-sized matrix,
the broadcast label queries against per-image queries, channels_last, bf16 autocast,
inference_mode, fused AdamW and torch.compile against plain fp32 eager; plus the benchmark's
own bookkeeping (ratios, interleaving, the table)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from benchmarks import timing
from benchmarks.cli import format_table
from benchmarks.exact_map import coco_sized_problem
from benchmarks.timing import Row, Workload, interleaved
from sklearn.metrics import average_precision_score

from q2l import metrics
from q2l.models import Query2Label, TimmBackbone
from q2l.models.transformer import Transformer

SMALL_HEAD = {"hidden_dim": 32, "ffn_dim": 64, "num_heads": 4}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Query2Label(TimmBackbone("resnet18", pretrained=False), num_classes=6, **SMALL_HEAD).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ---- metrics -------------------------------------------------------------------------------------


def _sklearn_ap(scores: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
    scores_np, targets_np = scores.double().numpy(), targets.numpy()
    per_class = []
    for column in range(scores_np.shape[1]):
        keep = targets_np[:, column] != -1
        per_class.append(average_precision_score(targets_np[keep, column], scores_np[keep, column]))
    return np.array(per_class)


@pytest.mark.parametrize("num_images", [40_137, 5_000], ids=["rows-radix-sorted-one-by-one", "short-rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_average_precision_equals_sklearn(num_images, dtype):
    scores, targets = coco_sized_problem(num_images, num_classes=24, seed=num_images)
    targets[torch.rand(targets.shape, generator=torch.Generator().manual_seed(2)) < 0.01] = -1
    scores = scores.to(dtype)
    np.testing.assert_allclose(metrics.average_precision(scores, targets).numpy(),
                               _sklearn_ap(scores, targets), rtol=0, atol=1e-12)


def test_fast_voc_average_precision_equals_the_loop_formula():
    scores, targets = coco_sized_problem(40_137, num_classes=4, seed=3)
    result = metrics.voc_average_precision(scores, targets).numpy()
    for column in range(scores.shape[1]):
        order = np.argsort(-scores[:, column].numpy(), kind="stable")
        hits = targets[:, column].numpy()[order] == 1
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        assert result[column] == pytest.approx(envelope[hits].mean(), abs=1e-12)


def test_metrics_restore_the_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with metrics.single_threaded():
            assert torch.get_num_threads() == 1
        metrics.average_precision(torch.rand(50, 3), torch.rand(50, 3) < 0.3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---- model paths ---------------------------------------------------------------------------------


def test_broadcast_label_queries_equal_per_image_queries():
    torch.manual_seed(0)
    for self_attention in (False, True):
        transformer = Transformer(hidden_dim=32, num_heads=4, ffn_dim=64,
                                  decoder_self_attention=self_attention).eval()
        memory, pos, label_embed = torch.randn(3, 10, 32), torch.randn(1, 10, 32), torch.randn(5, 32)
        fast = transformer(memory, pos, label_embed)
        # The plain formulation: every image gets its own copy of the K label queries.
        for layer in transformer.encoder_layers:
            memory = layer(memory, pos)
        query_pos = label_embed.expand(3, -1, -1)
        queries = torch.zeros_like(query_pos)
        for layer in transformer.decoder_layers:
            queries = layer(queries, memory + pos, memory, query_pos)
        torch.testing.assert_close(fast, transformer.decoder_norm(queries), rtol=1e-5, atol=1e-5)


def test_batch_elements_do_not_mix(model, images):
    with torch.no_grad():
        batched = model(images)
        single = torch.cat([model(image[None]) for image in images])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_channels_last_gives_the_same_logits_and_gradients(model, images):
    plain_logits = model(images)
    plain_grad = torch.autograd.grad(plain_logits.sum(), model.classifier.weight)[0]
    fast = Query2Label(TimmBackbone("resnet18", pretrained=False), num_classes=6, **SMALL_HEAD).eval()
    fast.load_state_dict(model.state_dict())
    fast = fast.to(memory_format=torch.channels_last)
    fast_logits = fast(images.contiguous(memory_format=torch.channels_last))
    fast_grad = torch.autograd.grad(fast_logits.sum(), fast.classifier.weight)[0]
    torch.testing.assert_close(fast_logits, plain_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_stays_within_bf16_error(model, images):
    with torch.no_grad():
        plain = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(images).float()
    # bf16 keeps 8 bits of mantissa (relative step 2^-8 ≈ 0.4%); errors accumulate over the layers.
    assert (fast - plain).abs().max() <= 0.05 * plain.abs().max() + 0.05


def test_inference_mode_equals_no_grad(model, images):
    with torch.no_grad():
        plain = model(images)
    with torch.inference_mode():
        fast = model(images)
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_adamw_implementations_take_the_same_steps(model, implementation):
    # The same gradients for every implementation, so only the update arithmetic is compared.
    generator = torch.Generator().manual_seed(0)
    gradients = [[torch.randn(p.shape, generator=generator) for p in model.parameters()] for _ in range(3)]
    results = {}
    for name, options in (("loop", {"foreach": False}), (implementation, {implementation: True})):
        parameters = [p.detach().clone().requires_grad_() for p in model.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-2, **options)
        for step_gradients in gradients:
            for parameter, gradient in zip(parameters, step_gradients, strict=True):
                parameter.grad = gradient.clone()
            optimizer.step()
        results[name] = torch.cat([p.detach().flatten() for p in parameters])
    torch.testing.assert_close(results[implementation], results["loop"], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compiled_model_gives_the_same_logits():
    """torch.compile in a subprocess (it takes tens of seconds on a small CPU): skipped past 30 s."""
    code = textwrap.dedent("""
        import torch
        from q2l.models import Query2Label, TimmBackbone
        torch.manual_seed(0)
        model = Query2Label(TimmBackbone("resnet18", pretrained=False), num_classes=6, hidden_dim=32,
                            ffn_dim=64).eval()
        images = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(model)(images), model(images), rtol=1e-4, atol=1e-4)
    """)
    try:
        subprocess.run([sys.executable, "-c", code], check=True, timeout=30, capture_output=True,
                       env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.environ.get(
                           "TORCHINDUCTOR_CACHE_DIR", "/tmp/q2l-inductor-cache")})
    except subprocess.TimeoutExpired:
        pytest.skip("torch.compile took more than 30 s on this machine")
    except subprocess.CalledProcessError as error:
        pytest.fail(error.stderr.decode()[-2000:])


# ---- benchmark bookkeeping -----------------------------------------------------------------------


def test_rows_report_ratios_so_that_above_one_means_q2l_is_ahead():
    assert Row("s", "rate", value=30.0, baseline=10.0, unit="img/s", target=1.5).ratio == 3.0
    faster = Row("s", "time", value=0.1, baseline=0.4, unit="s", target=3.0, lower_is_better=True)
    assert faster.ratio == 4.0 and faster.passed
    assert Row("s", "flops", value=1.0, baseline=None, unit="GFLOP").passed is None


def test_interleaved_runs_every_workload_every_round(monkeypatch):
    monkeypatch.setattr(timing, "QUIET_WAIT_S", 0.0)
    calls = []
    workloads = {name: Workload(lambda name=name: calls.append(name) or 4) for name in "abc"}
    rates = interleaved(workloads, rounds=3, warmup=1)
    assert sorted(calls) == sorted("abc" * 4)
    assert all(len(rate.samples) == 3 and rate.best >= rate.worst > 0 for rate in rates.values())


def test_table_lists_every_row_with_its_target():
    rows = [Row("b. exact mAP", "AP", 0.1, 0.5, "s", "sklearn", target=3.0, lower_is_better=True)]
    text = format_table(rows)
    assert "5.00×" in text and "≥ 3×" in text and "yes" in text and "sklearn" in text
    assert format_table(rows, markdown=True).startswith("| section |")
