"""Check q2l's CUDA paths on a machine with a GPU, and measure it against the official code.

    .venv/bin/python scripts/gpu_check.py --official ~/src/query2labels      # about 5 minutes
    .venv/bin/python scripts/gpu_check.py --quick                            # skips the demo run
    .venv/bin/python scripts/gpu_check.py --device cpu --quick --size 64     # the code paths on CPU

Each check runs on its own (a failure is recorded and the next one runs) and records what it
measured; the script prints a Markdown table for docs/performance.md, writes everything to
`--output` (JSON) and exits 1 when a check failed:

1. environment: torch, CUDA, cuDNN, the card, native bf16.
2. precision: q2l's training steps with bf16 autocast and with fp16 + the loss scaler overfit one
   batch (finite, falling loss); an fp16 step with an absurd loss scale is skipped without
   touching the weights, and the scale comes down.
3. channels_last: logits equal contiguous ones within the precision's error.
4. compile: `trainer.compile` (torch.compile) gives eager's logits; compile time and the
   training-step speed against eager.
5. nccl: a one-process NCCL group (gloo on CPU): q2l.utils.dist's collectives, and a training step
   through DistributedDataParallel equal to the plain step.
6. decode: dataset.decode=device on 640×480 JPEGs: the device's decode against the CPU's, its
   images/s at the paper's augmentation, and one CPU core's images/s with the PIL pipeline.
7. throughput: q2l at its defaults against the official code (its own --amp: fp16 autocast and
   GradScaler) at 448 px, training and inference, interleaved rounds; and the CPU cores the
   measured training rate needs with each pipeline.
8. demo: `python train.py experiment=demo` on the device: wall time and mAP.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as torch_dist
from hydra.utils import instantiate

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY), str(REPOSITORY / "src")]  # run from a checkout, installed or not

from benchmarks import official, pipeline
from benchmarks.memory import run_training
from benchmarks.throughput import CASES, build_case_model, compose_config
from benchmarks.timing import Workload, interleaved

from q2l.data.dataset import MultiLabelImageDataset
from q2l.data.device_decode import DeviceAugment, EncodedImages, collate_encoded, decode_batch
from q2l.data.transforms import build_train_transform
from q2l.models.backbone import normalization
from q2l.training.build import build_state, step_options
from q2l.training.engine import StepOptions, TrainState, evaluate, train_one_epoch
from q2l.utils import dist
from q2l.utils.amp import autocast, resolve_precision


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a machine with a GPU, or pass --device cpu", file=sys.stderr)
        return 2
    context = Context(args, device)
    checks: list[tuple[str, Callable[[Context], dict]]] = [
        ("environment", check_environment),
        ("precision", check_precision),
        ("channels_last", check_channels_last),
        ("compile", check_compile),
        ("nccl", check_nccl),
        ("decode", check_decode),
        ("throughput", check_throughput),
    ]
    if not args.quick:
        checks.append(("demo", check_demo))
    results = {}
    for name, check in checks:
        if args.only and name not in args.only.split(","):
            continue
        start = time.perf_counter()
        print(f"--- {name}", flush=True)
        try:
            record = {"ok": True, **check(context)}
        except Exception as error:  # one failing check must not hide the others' results
            record = {"ok": False, "error": f"{type(error).__name__}: {error}"}
            traceback.print_exc()
        record["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = record
        if device.type == "cuda":
            torch.cuda.empty_cache()  # each check builds its own models
        print(json.dumps(record, indent=1, default=str), flush=True)
    report = {"started": context.started, "argv": sys.argv[1:], "checks": results}
    output = Path(args.output or f"gpu-check-{context.started.replace(':', '')}.json")
    output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(markdown(results))
    print(f"wrote {output}")
    return 0 if all(record["ok"] for record in results.values()) else 1


class Context:
    """What the checks share: the options, the device, and figures one check hands the next."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.started = dt.datetime.now().isoformat(timespec="seconds")
        self.cpu_core_rate: float | None = None  # img/s of one CPU core, PIL pipeline (decode)
        self.read_core_rate: float | None = None  # img/s of one CPU core reading files

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def case(self):
        return CASES[self.args.case]

    def config(self, *extra: str):
        """The --case model (paper: R50 and the paper head) at --size px and --batch, with `extra`
        overrides, composed as train.py composes it."""
        size, batch = self.args.size, self.args.batch
        overrides = [*self.case.overrides, f"dataset.image_size={size}"]
        return compose_config([*overrides, f"dataset.batch_size={batch}", *extra])

    def q2l_state(self, cfg) -> tuple[TrainState, StepOptions]:
        """q2l's training state and step options on the device, as train.py builds them."""
        precision = resolve_precision(cfg.trainer.precision.value, self.device)
        model = build_case_model(self.case, cfg).to(self.device)
        loss = instantiate(cfg.loss).to(self.device)
        state = build_state(cfg, model, loss, 10**6 * cfg.dataset.batch_size, precision)
        return state, step_options(cfg, self.device, precision, self.case.num_classes)

    def batches(self, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        size, batch, classes = self.args.size, self.args.batch, self.case.num_classes
        return [
            (
                torch.randn(batch, 3, size, size, generator=generator).to(self.device),
                (torch.rand(batch, classes, generator=generator) < 0.1).float().to(self.device),
            )
            for _ in range(steps)
        ]


def check_environment(context: Context) -> dict:
    record = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(context.device),
        "precision_auto": resolve_precision("auto", context.device),
    }
    if context.device.type == "cuda":
        properties = torch.cuda.get_device_properties(context.device)
        record.update(
            card=properties.name,
            memory_gib=round(properties.total_memory / 2**30, 1),
            capability=f"{properties.major}.{properties.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            native_bf16=torch.cuda.is_bf16_supported(including_emulation=False),
        )
    return record


def check_precision(context: Context) -> dict:
    """bf16 and fp16 + GradScaler overfit one batch; an absurd fp16 scale skips its step."""
    record = {}
    batch = context.batches(1)
    for precision in ("bf16", "fp16"):
        state, options = context.q2l_state(context.config(f"trainer.precision={precision}"))
        losses: list[float] = []
        skipped: list[bool] = []

        def record_step(loss, skip, _batches, losses=losses, skipped=skipped) -> bool:
            losses.append(float(loss))
            skipped.append(skip)
            return False

        train_one_epoch(state, batch * 8, options, on_step=record_step)
        finite = all(torch.isfinite(torch.tensor(losses)).tolist())
        if not (finite and losses[-1] < losses[0]):
            raise AssertionError(f"{precision}: losses {losses} are not finite and falling")
        record[precision] = {
            "losses": [round(value, 4) for value in losses],
            "scaler_enabled": state.scaler.is_enabled(),
            "skipped_steps": sum(skipped),
        }
        if precision == "fp16":
            record["fp16"]["overflow"] = _forced_overflow(state, options, batch)
    return record


def _forced_overflow(state: TrainState, options: StepOptions, batch: list) -> dict:
    """An fp16 step at loss scale 2^40 overflows: skipped, weights unchanged, scale lowered."""
    state.scaler.update(new_scale=2.0**40)
    before = [p.detach().clone() for p in state.model.parameters()]
    skipped = []
    train_one_epoch(state, batch, options, on_step=lambda _l, skip, _n: skipped.append(skip))
    unchanged = all(
        torch.equal(a, b) for a, b in zip(before, state.model.parameters(), strict=True)
    )
    scale = state.scaler.get_scale()
    if not (skipped == [True] and unchanged and scale < 2.0**40):
        raise AssertionError(f"overflow not handled: skipped {skipped}, scale {scale}")
    return {"skipped": True, "weights_unchanged": True, "scale_after": scale}


def check_channels_last(context: Context) -> dict:
    """Logits of a channels_last model equal the contiguous model's within the precision."""
    cfg = context.config()
    model = build_case_model(context.case, cfg).to(context.device).eval()
    images, targets = context.batches(1)[0]
    precision = resolve_precision("auto", context.device)
    record = {}
    for name, memory in (("contiguous", torch.contiguous_format), ("nhwc", torch.channels_last)):
        model.to(memory_format=memory)
        options = StepOptions(
            context.device, precision=precision, channels_last=memory == torch.channels_last
        )
        with torch.inference_mode(), autocast(context.device, precision):
            record[name] = model(images.contiguous(memory_format=memory)).float()
        record[f"{name}_rate"] = _rate(
            context, lambda options=options: evaluate(model, [(images, targets)], options), images
        )
    difference = (record["nhwc"] - record["contiguous"]).abs().max().item()
    scale = record["contiguous"].abs().max().item()
    # bf16/fp16 keep 8/11 significant bits; TF32 convolutions 10.
    if difference > 0.05 * max(scale, 1.0):
        raise AssertionError(f"channels_last changed the logits by {difference:.3g} (max {scale})")
    return {
        "max_logit_difference": difference,
        "precision": precision,
        "inference_img_s": {"contiguous": record["contiguous_rate"], "nhwc": record["nhwc_rate"]},
    }


def check_compile(context: Context) -> dict:
    """trainer.compile: the same logits as eager; compile seconds; compiled/eager train speed."""
    eager_state, eager_options = context.q2l_state(context.config())
    compiled_state, options = context.q2l_state(context.config("trainer.compile=true"))
    compiled_state.model.load_state_dict(eager_state.model.state_dict())
    batches = context.batches(context.args.steps)
    images = batches[0][0]
    eager_state.model.eval()
    compiled_state.forward.eval()
    with torch.no_grad(), autocast(context.device, options.precision):
        start = time.perf_counter()
        compiled = compiled_state.forward(images).float()
        context.synchronize()
        compile_eval_s = time.perf_counter() - start
        eager = eager_state.model(images).float()
    difference = (compiled - eager).abs().max().item()
    if difference > 0.05 * max(eager.abs().max().item(), 1.0):
        raise AssertionError(f"torch.compile changed the logits by {difference:.3g}")
    start = time.perf_counter()
    train_one_epoch(compiled_state, batches[:1], options)
    context.synchronize()
    compile_train_s = time.perf_counter() - start
    rates = interleaved(
        {
            "eager": _train_workload(context, eager_state, eager_options, batches),
            "compiled": _train_workload(context, compiled_state, options, batches),
        },
        context.args.rounds,
    )
    ratios = [c / e for c, e in zip(rates["compiled"].samples, rates["eager"].samples, strict=True)]
    return {
        "max_logit_difference": difference,
        "compile_s": {"eval": round(compile_eval_s, 1), "train": round(compile_train_s, 1)},
        "train_img_s": {"eager": rates["eager"].median, "compiled": rates["compiled"].median},
        "compiled_over_eager": _spread(ratios),
    }


def check_nccl(context: Context) -> dict:
    """A one-process NCCL group (gloo on the CPU): collectives; a DDP step equals a plain one."""
    backend = "nccl" if context.device.type == "cuda" else "gloo"
    if context.device.type == "cuda":
        torch.cuda.set_device(context.device)
    store = torch_dist.FileStore(tempfile.mktemp(prefix="q2l-gpu-check-"), 1)
    torch_dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        record = {
            "backend": torch_dist.get_backend(),
            "any_rank": dist.any_rank(True),
            "sum_over_ranks": dist.sum_over_ranks(2.5),
            "broadcast": dist.broadcast({"a": 1}),
        }
        rows = dist.gather_rows(torch.arange(6.0, device=context.device).view(3, 2))
        if not (record["any_rank"] and record["sum_over_ranks"] == 2.5 and rows.shape == (3, 2)):
            raise AssertionError(f"collectives gave {record} and rows of shape {rows.shape}")
        cfg = context.config("trainer.ema_decay=0")
        plain, options = context.q2l_state(cfg)
        wrapped, _ = context.q2l_state(cfg)
        wrapped.model.load_state_dict(plain.model.state_dict())
        device_ids = [context.device.index or 0] if context.device.type == "cuda" else None
        wrapped.forward = torch.nn.parallel.DistributedDataParallel(
            wrapped.model, device_ids=device_ids
        )
        batch = context.batches(1)
        train_one_epoch(plain, batch, options)
        train_one_epoch(wrapped, batch, options)
        difference = max(
            (a - b).abs().max().item()
            for a, b in zip(plain.model.parameters(), wrapped.model.parameters(), strict=True)
        )
        if difference > 1e-3:
            raise AssertionError(f"the DDP step moved the weights {difference:.3g} differently")
        record["ddp_step_max_weight_difference"] = difference
        return record
    finally:
        torch_dist.destroy_process_group()


def check_decode(context: Context) -> dict:
    """dataset.decode=device against the CPU: decoded pixels, device img/s, CPU core img/s."""
    size = context.args.size
    mean, std = normalization("resnet50")
    with tempfile.TemporaryDirectory(prefix="q2l-gpu-check-jpeg-") as folder:
        paths = pipeline.write_jpegs(Path(folder), context.args.jpegs)
        labels = torch.zeros(len(paths), 1, dtype=torch.int8).numpy()
        files = EncodedImages(MultiLabelImageDataset(paths, labels, ["object"]))
        batch, targets = collate_encoded([files[i] for i in range(len(files))])
        on_device = decode_batch(batch, context.device)
        on_cpu = decode_batch(batch, torch.device("cpu"))
        difference = max(
            (a.cpu().float() - b.float()).abs().mean().item()
            for a, b in zip(on_device, on_cpu, strict=True)
        )
        if difference > 2.0:
            raise AssertionError(f"device decoding differs from the CPU's by {difference:.2f}")
        augment = DeviceAugment(
            context.device, size, mean, std, channels_last=True, **pipeline.PAPER_AUGMENT
        )
        device_rate = _rate(context, lambda: augment(batch, targets), batch.data)
        cpu = MultiLabelImageDataset(
            paths,
            labels,
            ["object"],
            build_train_transform(size, mean, std, **pipeline.PAPER_AUGMENT),
        )
        torch.set_num_threads(1)  # one DataLoader worker's core
        try:
            rates = interleaved(
                {
                    "pil": Workload(lambda: sum(1 for i in range(len(cpu)) if cpu[i] is not None)),
                    "read": Workload(
                        lambda: sum(1 for i in range(len(files)) if files[i] is not None)
                    ),
                },
                context.args.rounds,
            )
        finally:
            torch.set_num_threads(context.args.threads)
    context.cpu_core_rate, context.read_core_rate = rates["pil"].median, rates["read"].median
    return {
        "mean_pixel_difference_device_vs_cpu": difference,
        "device_decode_augment_img_s": device_rate,
        "cpu_core_img_s": {
            "pil_pipeline": context.cpu_core_rate,
            "read_only": context.read_core_rate,
        },
    }


def check_throughput(context: Context) -> dict:
    """q2l at its defaults against the official code (--amp) at --size px, train and inference."""
    batches = context.batches(context.args.steps)
    state, options = context.q2l_state(context.config())
    train = {"q2l": _train_workload(context, state, options, batches)}
    infer = {"q2l": _infer_workload(context, state.model, options, batches)}
    code = None
    root = official.locate(context.args.official) if context.args.case == "paper" else None
    if root is not None:
        code = official.load(root)
        model = _official_model(code, context.args.size).to(context.device)
        train["official"] = _official_train(context, code, model, batches)
        infer["official"] = _official_infer(context, model, batches)
    train_rates = interleaved(train, context.args.rounds)
    infer_rates = interleaved(infer, context.args.rounds)
    record = {
        "image_size": context.args.size,
        "batch": context.args.batch,
        "q2l_precision": options.precision,
        "train_img_s": {name: rate.median for name, rate in train_rates.items()},
        "inference_img_s": {name: rate.median for name, rate in infer_rates.items()},
    }
    if code is not None:
        for kind, rates in (("train", train_rates), ("inference", infer_rates)):
            ratios = [
                a / b for a, b in zip(rates["q2l"].samples, rates["official"].samples, strict=True)
            ]
            record[f"{kind}_q2l_over_official"] = _spread(ratios)
    else:
        record["official"] = f"skipped: {official.HOW_TO_SUPPLY}"
    rate = train_rates["q2l"].median
    if context.cpu_core_rate:
        record["cpu_cores_needed_at_q2l_train_rate"] = {
            "pil_pipeline": round(rate / context.cpu_core_rate, 1),
            "decode_device": round(rate / context.read_core_rate, 2),
        }
    return record


def check_demo(context: Context) -> dict:
    """`python train.py experiment=demo` on the device, from nothing: wall time and best mAP."""
    run = run_training([f"trainer.device={context.device}"])
    return {"wall_time_s": round(run.wall_time_s, 1), "best_map": run.summary["best"]["mAP"]}


# ---- workloads -----------------------------------------------------------------------------------


def _train_workload(context, state: TrainState, options: StepOptions, batches: list) -> Workload:
    def run() -> int:
        train_one_epoch(state, batches, options)
        context.synchronize()
        return sum(images.shape[0] for images, _ in batches)

    return Workload(run, keep_freed_memory=True)


def _infer_workload(context, model, options: StepOptions, batches: list) -> Workload:
    eval_options = StepOptions(
        options.device, precision=options.precision, channels_last=options.channels_last
    )

    def run() -> int:
        evaluate(model, batches, eval_options)
        context.synchronize()
        return sum(images.shape[0] for images, _ in batches)

    return Workload(run, keep_freed_memory=True)


def _official_model(code: official.OfficialCode, image_size: int) -> torch.nn.Module:
    """The official Q2L in the paper setting at `image_size` (its position encoding needs it)."""
    args = argparse.Namespace(**{**official.PAPER_ARGS, "img_size": image_size, "num_class": 80})
    torch.manual_seed(0)
    return code.build_q2l(args)


def _official_train(context, code, model, batches: list) -> Workload:
    """main_mlc.train with --amp: fp16 autocast, GradScaler, loss.item(), AdamW, OneCycle, EMA."""
    args = argparse.Namespace(**official.PAPER_ARGS)
    criterion = code.loss_class(
        gamma_neg=args.gamma_neg,
        gamma_pos=args.gamma_pos,
        clip=args.loss_clip,
        eps=args.eps,
        disable_torch_grad_focal_loss=args.dtgfl,
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], args.lr, weight_decay=args.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, steps_per_epoch=len(batches), epochs=100_000, pct_start=0.2
    )
    ema = code.ema_class(model, args.ema_decay)
    amp = context.device.type == "cuda"
    scaler = torch.amp.GradScaler(context.device.type, enabled=amp)

    def run() -> int:
        model.train()
        for images, targets in batches:
            with torch.autocast(context.device.type, dtype=torch.float16, enabled=amp):
                loss = criterion(model(images), targets)
            loss.item()
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            ema.update(model)
        context.synchronize()
        return sum(images.shape[0] for images, _ in batches)

    return Workload(run)


def _official_infer(context, model, batches: list) -> Workload:
    """main_mlc.validate with --amp: fp16 autocast forward, sigmoid, scores kept on the CPU."""
    amp = context.device.type == "cuda"

    def run() -> int:
        model.eval()
        with torch.no_grad():
            for images, _ in batches:
                with torch.autocast(context.device.type, dtype=torch.float16, enabled=amp):
                    scores = torch.sigmoid(model(images))
                scores.cpu()
        context.synchronize()
        return sum(images.shape[0] for images, _ in batches)

    return Workload(run)


def _rate(context: Context, work: Callable[[], object], items, repeats: int = 5) -> float:
    """Items per second of `work` (after one warm-up call), the best of `repeats` calls."""
    work()
    context.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        context.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def _spread(ratios: list[float]) -> dict:
    ordered = sorted(ratios)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1]}


def markdown(results: dict[str, dict]) -> str:
    """One table row per check: ok, seconds, and its main figures."""
    lines = ["| check | ok | s | figures |", "|---|---|---|---|"]
    for name, record in results.items():
        figures = {k: v for k, v in record.items() if k not in ("ok", "seconds")}
        text = json.dumps(figures, default=str).replace("|", "/")
        lines.append(
            f"| {name} | {'yes' if record['ok'] else 'NO'} | {record['seconds']} | {text} |"
        )
    return "\n".join(lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument(
        "--official", metavar="PATH", help=f"checkout of the official code (or ${official.ENV_VAR})"
    )
    parser.add_argument(
        "--case", default="paper", choices=sorted(CASES), help="model (demo: a quick dry run)"
    )
    parser.add_argument("--size", type=int, default=448, help="image size (paper: 448)")
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds")
    parser.add_argument("--jpegs", type=int, default=128, help="640×480 JPEGs for the decode check")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true", help="skip the demo run")
    parser.add_argument("--only", help="comma-separated checks to run")
    parser.add_argument("--output", help="JSON report (default gpu-check-<time>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


if __name__ == "__main__":
    sys.exit(main())
