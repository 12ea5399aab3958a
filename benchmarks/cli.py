"""`make bench` / `python -m benchmarks`: run the sections, print the table, write the JSON.

    python -m benchmarks --official ~/src/query2labels   # everything, with the official code
    python -m benchmarks                       # everything but the official-code rows
    python -m benchmarks --quick               # fewer rounds, smaller runs, no demo run
    python -m benchmarks --sections b,c        # exact mAP and data pipeline only
    python -m benchmarks --markdown            # the table as Markdown, for docs/performance.md
    python -m benchmarks --render bench-results/bench-<time>.json --markdown   # a saved run
    make bench ARGS="--quick --sections a --cases demo"

The official Query2Label code is never part of this repository: --official (or the
Q2L_OFFICIAL_CODE environment variable) names a checkout of SlongLiu/query2labels, which
benchmarks/official.py imports with its CPU shims. Without it those rows are skipped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks import (
    contention,
    distributed,
    exact_map,
    flops,
    inference,
    levers,
    memory,
    official,
    pipeline,
    throughput,
    timing,
)
from benchmarks.timing import Row, machine, matmul_peak

log = logging.getLogger("q2l.bench")

SECTIONS = {
    "a": "throughput: train step and inference, q2l at its defaults vs plain fp32 eager and "
    "(paper case, with --official) vs the official Query2Label code",
    "b": "exact mAP on a COCO-val-sized matrix vs sklearn and torchmetrics",
    "c": "data pipeline images/s per worker core: 448 px paper augmentation vs the official code "
    "(with --official), eval transforms vs plain PIL + torchvision; cores per GPU",
    "d": "peak resident memory of a short training run, and its growth across epochs",
    "e": "FLOPs per image and share of the measured matmul peak",
    "levers": "each default speed setting alone against the plain baseline",
    "f": "`make train` (the demo) end to end, from nothing: wall time and mAP",
    "g": "DDP on CPU: 2 processes (gloo, 1 thread each) vs 1 process (2 threads), demo model",
    "h": "inference: predict images/s, ONNX Runtime vs PyTorch, attention-map hook cost",
    "i": "contention: `make train` beside a busy 2-thread neighbour vs quiet (within 2x), and the "
    "governed training step vs a fixed thread count beside it",
}
QUICK_SKIPS = {"f", "i"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sections",
        default="all",
        help="comma-separated: " + ", ".join(f"{k} ({v})" for k, v in SECTIONS.items()),
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds and smaller runs; skips f"
    )
    parser.add_argument(
        "--cases", default="paper,demo", help="model cases for a/e/levers: paper, demo"
    )
    parser.add_argument(
        "--lever-cases",
        default=None,
        help="model cases for the levers (default: paper,demo; demo with --quick)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per comparison")
    parser.add_argument(
        "--official",
        metavar="PATH",
        default=None,
        help=f"checkout of SlongLiu/query2labels (default: ${official.ENV_VAR})",
    )
    parser.add_argument(
        "--compile", action="store_true", help="add torch.compile to the levers (slow)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for every measurement, subprocesses included "
        "(default: PyTorch's own choice on this machine)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=timing.QUIET_WAIT_S,
        help="seconds to wait before each round for other processes to go quiet (0: never)",
    )
    parser.add_argument(
        "--output-dir", default="bench-results", help="where bench-<time>.json goes"
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--render", metavar="JSON", help="print the table of a saved run and exit")
    args = parser.parse_args(argv)
    chosen = (
        set(SECTIONS) if args.sections == "all" else {s.strip() for s in args.sections.split(",")}
    )
    unknown = chosen - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {sorted(SECTIONS)}")
    if args.quick and args.sections == "all":
        chosen -= QUICK_SKIPS
    args.sections = chosen
    args.cases = _cases(parser, args.cases)
    args.lever_cases = _cases(parser, args.lever_cases or ("demo" if args.quick else "paper,demo"))
    return args


def _cases(parser: argparse.ArgumentParser, text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    unknown = set(cases) - set(throughput.CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {sorted(throughput.CASES)}")
    return cases


def run(args: argparse.Namespace) -> tuple[list[Row], list[str], dict]:
    """Every selected section; a failing section is reported and the others still run."""
    rows: list[Row] = []
    errors: list[str] = []
    extra: dict = {"skipped": []}

    def section(name: str, fn, *fn_args, **fn_kwargs):
        log.info("section %s ...", name)
        start = time.perf_counter()
        try:
            result = fn(*fn_args, **fn_kwargs)
        except Exception as error:  # one broken section must not hide the others' numbers
            errors.append(f"{name}: {type(error).__name__}: {error}")
            log.error("section %s failed:\n%s", name, traceback.format_exc())
            return None
        log.info("section %s done in %.0f s", name, time.perf_counter() - start)
        return result

    quick = args.quick
    if args.sections & {"a", "e", "levers"}:
        official_code = None
        if "a" in args.sections and "paper" in args.cases:
            official_code = section("official code", _load_official, args.official, extra)
        # Peaks: the best of a standalone measurement and of every round of section a.
        peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
        flops_inputs = []
        for key in dict.fromkeys(args.cases + args.lever_cases):
            paper = key == "paper"
            rounds = args.rounds or (2 if quick else 5)
            with throughput.build_sides(throughput.CASES[key], 3 if paper else 4) as sides:
                if key in args.cases and args.sections & {"a", "e"}:
                    measured = section(
                        f"a {key}",
                        throughput.measure_throughput,
                        sides,
                        rounds,
                        official_code if paper else None,
                    )
                    if measured is not None:
                        throughput_rows, rates = measured
                        for name in peaks:
                            peaks[name] = max(peaks[name], rates[f"peak_{name}"].best)
                        if "a" in args.sections:
                            rows += throughput_rows
                        if "e" in args.sections:
                            counted = section(f"e {key}", flops.case_flops, sides)
                            if counted is not None:
                                medians = {name: rate.median for name, rate in rates.items()}
                                flops_inputs.append(
                                    (key, sides.options.precision, counted, medians)
                                )
                if key in args.lever_cases and "levers" in args.sections:
                    lever_rounds = max(rounds - 2, 1) if paper else rounds
                    rows += (
                        section(
                            f"levers {key}",
                            levers.measure_levers,
                            sides,
                            lever_rounds,
                            with_compile=args.compile,
                        )
                        or []
                    )
        for key, precision, counted, medians in flops_inputs:
            rows += flops.flops_rows(key, precision, counted, medians, peaks)
        extra["matmul_peak_gflops"] = {name: value / 1e9 for name, value in peaks.items()}
    if "b" in args.sections:
        rounds = args.rounds or (3 if quick else 7)
        rows += section("b", exact_map.measure_exact_map, rounds) or []
    if "c" in args.sections:
        rounds = args.rounds or (2 if quick else 4)
        official_root = official.locate(args.official)
        if official_root is None:
            extra["skipped"].append(f"official data pipeline row: {official.HOW_TO_SUPPLY}")
        rows += (
            section("c", pipeline.measure_pipeline, 24 if quick else 64, rounds, official_root)
            or []
        )
    if "d" in args.sections:
        epochs, num_train = (3, 256) if quick else (6, 512)
        rows += section("d", memory.measure_memory, epochs, num_train, num_train // 4) or []
    if "f" in args.sections:
        rows += section("f", memory.measure_demo_run) or []
    if "g" in args.sections:
        rows += (
            section("g", distributed.measure_ddp_scaling, args.rounds or (1 if quick else 3)) or []
        )
    if "i" in args.sections:
        rows += section("i", contention.measure_contention, args.rounds or 5) or []
    if "h" in args.sections:
        cases = ["demo"] if quick else args.cases
        rows += (
            section("h", inference.measure_inference, cases, args.rounds or (2 if quick else 5))
            or []
        )
    return rows, errors, extra


def _load_official(path: str | None, extra: dict) -> official.OfficialCode | None:
    """The official code from --official or Q2L_OFFICIAL_CODE; None (rows skipped) when unset."""
    root = official.locate(path)
    if root is None:
        extra["skipped"].append(f"official-code rows: {official.HOW_TO_SUPPLY}")
        log.warning("skipping the official-code rows: %s", official.HOW_TO_SUPPLY)
        return None
    extra["official_code"] = str(root)
    return official.load(root)


def format_table(rows: list[Row], markdown: bool = False) -> str:
    """The report: one line per row, then the notes (baseline names, settings, caveats)."""
    header = ["section", "measurement", "q2l", "baseline", "ratio", "spread", "target", "ok"]
    notes: dict[str, str] = {}  # note text -> its label, so repeated notes are printed once
    lines = []
    for row in rows:
        parts = (row.baseline_name and f"baseline: {row.baseline_name}", row.note)
        note = "; ".join(part for part in parts if part)
        label = notes.setdefault(note, f"[{len(notes) + 1}]") if note else ""
        spread = f"{row.ratio_low:.2f}–{row.ratio_high:.2f}" if row.ratio_low is not None else "—"
        lines.append(
            [
                row.section,
                f"{row.name} {label}".rstrip(),
                _number(row.value, row.unit),
                _number(row.baseline, row.unit) if row.baseline is not None else "—",
                f"{row.ratio:.2f}×" if row.ratio is not None else "—",
                spread,
                f"≥ {row.target:g}×" if row.target is not None else "—",
                {True: "yes", False: "NO", None: ""}[row.passed],
            ]
        )
    footnotes = [f"{label} {note}" for note, label in notes.items()]
    if markdown:
        table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        table += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(table + [""] + [f"- {note}" for note in footnotes])
    widths = [max(len(str(cells[i])) for cells in [header, *lines]) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
        for cells in [header, ["-" * w for w in widths], *lines]
    ]
    return "\n".join(text + [""] + footnotes)


DERIVED = ("ratio", "ratio_low", "ratio_high", "passed")  # recomputed from the other fields


def load_rows(path: Path) -> list[Row]:
    """The rows of a report written by `main`."""
    return [
        Row(**{key: value for key, value in record.items() if key not in DERIVED})
        for record in json.loads(path.read_text())["rows"]
    ]


def _number(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    if args.render:
        print(format_table(load_rows(Path(args.render)), markdown=args.markdown))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    timing.QUIET_WAIT_S = args.quiet_wait
    started = dt.datetime.now()
    info = machine()
    log.info(
        "benchmarking on %s, %d intra-op threads (subprocesses: OMP_NUM_THREADS=%d); sections %s",
        info["cpu"],
        info["torch_threads"],
        info["torch_threads"],
        ",".join(sorted(args.sections)),
    )
    start = time.perf_counter()
    rows, errors, extra = run(args)
    duration = time.perf_counter() - start
    print(format_table(rows, markdown=args.markdown))
    for skipped in extra["skipped"]:
        print(f"SKIPPED {skipped}")
    for error in errors:
        print(f"FAILED {error}")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"bench-{started:%Y%m%d-%H%M%S}.json"
    report = {
        "format_version": 2,
        "started_at": started.isoformat(timespec="seconds"),
        "duration_s": round(duration, 1),
        "argv": sys.argv[1:] if argv is None else argv,
        "quick": args.quick,
        "machine": info,
        "load_average_1min_at_end": machine()["load_average_1min"],
        "quiet_rounds": timing.quiet_stats,
        **extra,
        "rows": [row.as_dict() for row in rows],
        "errors": errors,
    }
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {path} ({duration:.0f} s)")
    return 1 if errors else 0
