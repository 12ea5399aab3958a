"""q2l's benchmarks (`make bench` = `python -m benchmarks`): every figure is a ratio against a
baseline measured in the same run, in interleaved rounds.

Sections: a. training and inference throughput of q2l at its defaults against plain fp32 eager
PyTorch and, given a checkout (--official), the official Query2Label code; b. exact mAP against
sklearn and torchmetrics; c. data pipeline against plain PIL + torchvision; d. resident memory
across epochs; e. FLOPs and the share of the matmul peak; levers: each default speed setting
alone; f. the demo run end to end. docs/performance.md holds a full run.
"""
