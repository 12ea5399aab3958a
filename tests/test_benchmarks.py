"""The fast paths the benchmarks measure give the plain paths' results, and the benchmarks measure
what they say: q2l at its config defaults, the official code under shims that leave the process as
it was, ratios as the median of paired rounds. No timing is asserted here: speed targets live in
`make bench`."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from benchmarks import official, timing
from benchmarks.cli import format_table, load_rows
from benchmarks.exact_map import coco_sized_problem
from benchmarks.flops import flops_rows
from benchmarks.throughput import CASES, build_sides, compose_config, q2l_forward_backward
from benchmarks.timing import Rates, Row, Workload, compare, interleaved
from torch import nn

from q2l import metrics
from q2l.models import Query2Label, TimmBackbone
from q2l.models.official import convert_official_state_dict
from q2l.models.transformer import Transformer
from q2l.training.checkpoint import load_strict
from q2l.utils.amp import resolve_precision

from .helpers.reference import sklearn_ap

SMALL_HEAD = {"hidden_dim": 32, "ffn_dim": 64, "num_heads": 4}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = TimmBackbone("resnet18", pretrained=False)
    return Query2Label(backbone, num_classes=6, **SMALL_HEAD).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ---- metrics -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_images", [40_137, 5_000], ids=["rows-radix-sorted-one-by-one", "short-rows"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_average_precision_equals_sklearn(num_images, dtype):
    scores, targets = coco_sized_problem(num_images, num_classes=24, seed=num_images)
    targets[torch.rand(targets.shape, generator=torch.Generator().manual_seed(2)) < 0.01] = -1
    scores = scores.to(dtype)
    np.testing.assert_allclose(
        metrics.average_precision(scores, targets).numpy(),
        sklearn_ap(scores, targets),
        rtol=0,
        atol=1e-12,
    )


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
        transformer = Transformer(
            hidden_dim=32, num_heads=4, ffn_dim=64, decoder_self_attention=self_attention
        ).eval()
        memory, pos = torch.randn(3, 10, 32), torch.randn(1, 10, 32)
        label_embed = torch.randn(5, 32)
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
    backbone = TimmBackbone("resnet18", pretrained=False)
    fast = Query2Label(backbone, num_classes=6, **SMALL_HEAD).eval()
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


def test_fused_adamw_takes_the_for_loop_steps(model):
    # The head's parameters (every shape kind: matrices, vectors, the label embedding) and the
    # same gradients for both implementations, so only the update arithmetic is compared.
    head = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    generator = torch.Generator().manual_seed(0)
    gradients = [[torch.randn(p.shape, generator=generator) for p in head] for _ in range(3)]
    results = {}
    for name, options in (("loop", {"foreach": False}), ("fused", {"fused": True})):
        parameters = [p.detach().clone().requires_grad_() for p in head]
        optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-2, **options)
        for step_gradients in gradients:
            for parameter, gradient in zip(parameters, step_gradients, strict=True):
                parameter.grad = gradient.clone()
            optimizer.step()
        results[name] = torch.cat([p.detach().flatten() for p in parameters])
    torch.testing.assert_close(results["fused"], results["loop"], rtol=1e-6, atol=1e-7)


class _TinyBackbone(nn.Sequential):
    """A conv stem standing in for timm: the graph under test is q2l's own head."""

    num_channels = 16

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 16, 3, stride=4, padding=1), nn.BatchNorm2d(16), nn.ReLU())


def test_the_model_compiles_to_one_graph_with_the_same_logits_and_gradients():
    """trainer.compile=true: TorchDynamo captures the training forward pass whole (fullgraph: a
    graph break fails) and the captured graph computes the eager logits and gradients. Inductor's
    code generation takes minutes on a small CPU; `make bench ARGS=--compile` checks its logits."""
    torch.manual_seed(0)
    model = Query2Label(_TinyBackbone(), num_classes=6, dropout=0.0, **SMALL_HEAD).train()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    try:
        results = []
        for forward in (model, compiled):
            logits = forward(images)
            results.append((logits, torch.autograd.grad(logits.square().sum(), model.parameters())))
    finally:
        torch._dynamo.reset()
    (eager, eager_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_grads, eager_grads, rtol=1e-5, atol=1e-6)


# ---- what the benchmarks measure -----------------------------------------------------------------


def test_the_q2l_side_runs_the_config_defaults():
    with build_sides(CASES["demo"], steps=1) as sides:
        state, options = sides.state, sides.options
        trainer = sides.cfg.trainer
        assert options.precision == resolve_precision("auto", torch.device("cpu"))
        assert options.channels_last and options.check_finite
        assert options.accumulate == trainer.accumulate_grad_batches == 1
        assert options.grad_clip_norm is trainer.grad_clip_norm is None
        conv = next(m for m in state.model.modules() if isinstance(m, nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        assert all(group["fused"] for group in state.optimizer.param_groups)
        assert state.ema is not None
        # The plain baseline is none of that.
        plain_conv = next(m for m in sides.plain_model.modules() if isinstance(m, nn.Conv2d))
        assert plain_conv.weight.is_contiguous()
        assert not any(group["fused"] for group in sides.plain_optimizer.param_groups)


def test_the_step_ceiling_runs_the_passes_alone_and_is_reported_beside_the_step():
    """Section e's ceiling: q2l's forward and backward passes without the optimizer or the EMA,
    which change nothing, and its share of the peak in a row of its own."""
    with build_sides(CASES["demo"], steps=1) as sides:
        model = sides.state.model
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        workload = q2l_forward_backward(model, sides.options, sides.loss_fn, sides.batches)
        assert workload.run() == sides.batches[0][0].shape[0]
        for name, parameter in model.named_parameters():
            assert torch.equal(parameter, before[name]) and parameter.grad is None, name

    rates = {"train_plain": 1.0, "train_q2l": 2.0, "train_q2l forward+backward": 3.0}
    rates |= {"infer_plain": 4.0, "infer_q2l": 8.0}
    rows = flops_rows(
        "demo", "bf16", {"forward": 1e9, "train": 3e9}, rates, {"fp32": 1e11, "bf16": 3e11}
    )
    [ceiling] = [row for row in rows if "forward+backward alone" in row.name]
    assert (ceiling.value, ceiling.baseline) == (9.0, 300.0)  # GFLOP/s: 3 GFLOP x 3 img/s
    [step] = [row for row in rows if row.name == "demo train: q2l achieved / bf16 matmul peak"]
    assert step.value == 6.0


def test_the_official_code_is_found_only_where_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(official.ENV_VAR, raising=False)
    assert official.locate(None) is None
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        official.locate(str(tmp_path))
    (tmp_path / "lib" / "models").mkdir(parents=True)
    (tmp_path / "lib" / "models" / "query2label.py").write_text("")
    monkeypatch.setenv(official.ENV_VAR, str(tmp_path))
    assert official.locate(None) == tmp_path.resolve()


def test_the_shims_import_a_checkout_without_its_package_init(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "__init__.py").write_text("import inplace_abn\n")  # fails, as the official one does
    (folder / "head.py").write_text("from models.stub import build\nVALUE = build\n")
    sys.modules["models"] = before = object()  # a module of the same name elsewhere survives
    try:
        with official._packages({"models": folder}) as modules:
            modules["models.stub"] = official._stub("models.stub", "build")
            import models.head

            head = models.head
        assert sys.modules["models"] is before and "models.head" not in sys.modules
    finally:
        del sys.modules["models"]
    with pytest.raises(NotImplementedError, match="models.stub"):
        head.VALUE()


def test_pretrained_true_in_the_official_code_downloads_nothing():
    resnet = official._WithoutDownload().resnet18(pretrained=True, num_classes=3)
    assert resnet.fc.out_features == 3


def test_the_paper_case_builds_the_official_layout():
    """The "same architecture" rows compare q2l with the official code: the paper case must be
    the official layout (post-norm with its final LayerNorm, dropout 0.1), not q2l's default."""
    cfg = compose_config(CASES["paper"].overrides)
    assert (cfg.model.norm, cfg.model.dropout, cfg.model.input_proj) == ("post", 0.1, False)
    assert (cfg.model.hidden_dim, cfg.model.ffn_dim, cfg.model.num_heads) == (2048, 8192, 4)
    assert (cfg.model.num_encoder_layers, cfg.model.num_decoder_layers) == (1, 2)
    assert cfg.model.decoder_self_attention == "none"


@pytest.mark.skipif(
    not official.locate(None), reason=f"set {official.ENV_VAR} to a checkout of the official code"
)
def test_the_official_model_has_the_paper_case_architecture():
    """Run where a checkout is at hand: the bench compares the same model on both sides. The
    official model's weights load strictly into the paper case's q2l model (q2l-import's
    conversion), which then gives the official logits."""
    with build_sides(CASES["paper"], steps=1) as sides:
        q2l_model = sides.plain_model.eval()
        q2l_count = sum(p.numel() for p in q2l_model.parameters())
        code = official.load(official.locate(None))
        model = official.build_model(code, CASES["paper"].num_classes).eval()
        # The official BatchNorm keeps its affine terms as buffers; every other weight is a
        # parameter.
        frozen_norms = [m for m in model.modules() if type(m).__name__ == "FrozenBatchNorm2d"]
        affine = sum(m.weight.numel() + m.bias.numel() for m in frozen_norms)
        assert sum(p.numel() for p in model.parameters()) + affine == q2l_count
        state = {key: value.detach() for key, value in model.state_dict().items()}
        load_strict(q2l_model, convert_official_state_dict(state, q2l_model), "official")
        images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            difference = float((q2l_model(images) - model(images)).abs().max())
    print(f"paper case vs the official model: max |logit difference| = {difference:.2e}")
    assert difference < 1e-4
    assert "models" not in sys.modules and "utils" not in sys.modules


# ---- benchmark bookkeeping -----------------------------------------------------------------------


def test_rows_report_ratios_so_that_above_one_means_q2l_is_ahead():
    assert Row("s", "rate", value=30.0, baseline=10.0, unit="img/s", target=1.5).ratio == 3.0
    faster = Row("s", "time", value=0.1, baseline=0.4, unit="s", target=3.0, lower_is_better=True)
    assert faster.ratio == 4.0 and faster.passed
    assert Row("s", "flops", value=1.0, baseline=None, unit="GFLOP").passed is None


def test_compared_rows_take_the_median_of_paired_rounds():
    # Round 2 is slowed for both sides alike: pairing keeps its ratio at 2.
    q2l, baseline = Rates([20.0, 4.0, 30.0]), Rates([10.0, 2.0, 10.0])
    row = compare("a", "train", q2l, baseline, "img/s", target=2.0)
    assert (row.ratio, row.ratio_low, row.ratio_high) == (2.0, 2.0, 3.0)
    assert (row.value, row.baseline, row.passed) == (20.0, 10.0, True)
    seconds = compare("b", "AP", Rates([10.0, 8.0]), Rates([2.0, 2.0]), "s", seconds=True)
    assert seconds.value == pytest.approx(1 / 9) and seconds.baseline == 0.5
    assert seconds.ratio == pytest.approx(4.5) and seconds.lower_is_better


def test_interleaved_runs_every_workload_every_round(monkeypatch):
    monkeypatch.setattr(timing, "QUIET_WAIT_S", 0.0)
    calls = []
    workloads = {name: Workload(lambda name=name: calls.append(name) or 4) for name in "abc"}
    rates = interleaved(workloads, rounds=3, warmup=1)
    assert sorted(calls) == sorted("abc" * 4)
    assert all(len(rate.samples) == 3 and rate.best >= rate.worst > 0 for rate in rates.values())


def test_table_lists_every_row_with_its_target_and_spread(tmp_path):
    row = compare(
        "b. exact mAP",
        "AP",
        Rates([10.0, 12.0]),
        Rates([2.0, 3.0]),
        "s",
        "sklearn",
        seconds=True,
        target=3.0,
    )
    text = format_table([row])
    assert "4.50×" in text and "4.00–5.00" in text and "≥ 3×" in text and "yes" in text
    assert "sklearn" in text
    assert format_table([row], markdown=True).startswith("| section |")
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps({"rows": [row.as_dict()]}))
    assert load_rows(saved) == [row]


@pytest.mark.slow
def test_the_step_profile_puts_every_operator_in_a_bucket_and_the_shares_add_up():
    from benchmarks.profile_step import bucket_of, profile_steps, render

    assert bucket_of("aten::convolution_backward") == "convolution backward"
    assert bucket_of("aten::mkldnn_convolution") == "convolution forward"
    assert bucket_of("aten::_to_copy") == "casts and copies"
    assert bucket_of("aten::_fused_adamw_") == "optimizer (fused AdamW)"
    assert bucket_of("aten::something_new") == "other"
    result = profile_steps("demo", steps=1, warmup=1, precision="fp32")
    assert result["precision"] == "fp32"
    assert sum(result["buckets"].values()) == pytest.approx(1.0)
    assert result["buckets"]["convolution backward"] > 0.1  # a CNN step's biggest part
    assert "| convolution backward |" in render(result)
