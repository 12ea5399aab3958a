"""Benchmarks for issue #4: every figure is a ratio against a baseline measured in the same run.

Sections (`python scripts/bench.py --help`): a. training and inference throughput against plain
fp32 eager PyTorch, b. exact mAP against sklearn and torchmetrics, c. data pipeline against plain
PIL + torchvision, d. resident memory across epochs, e. FLOPs and the share of the matmul peak,
levers: each optimisation alone, f. the demo run end to end. docs/performance.md holds a full run.
"""
