"""Simulated partial annotation: hide a seeded share of each training image's labels.

The partial-label literature (Durand et al., CVPR 2019; Ben-Baruch et al., CVPR 2022) trains on
fully annotated sets such as COCO with a random share of every image's labels removed, and
evaluates on the full validation labels. `hide_labels` does the removing: a hidden label becomes
-1 (unknown), which `loss=partial_asl` (and BCE) leave out or treat as configured.
"""

from __future__ import annotations

import numpy as np

from q2l.utils.errors import ConfigError

# Fixed, so the hidden labels for a seed never depend on anything but the labels.
_ROWS_PER_BLOCK = 8192


def hide_labels(labels: np.ndarray, keep_ratio: float, seed: int = 0) -> np.ndarray:
    """Copy of `labels` (N, K) with all but round(keep_ratio · known) known labels per image at -1.

    Each image keeps a uniformly random subset of its known (1 or 0) labels, the same for a given
    seed whatever else changes in the run; labels already -1 stay -1. keep_ratio 1 returns an
    unchanged copy.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f"partial.keep_ratio must be in (0, 1], got {keep_ratio}")
    hidden = labels.copy()
    if keep_ratio == 1.0:
        return hidden
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x9A2717]))
    # In blocks of rows, so Open Images-sized matrices do not need N·K float64 keys at once.
    for start in range(0, len(labels), _ROWS_PER_BLOCK):
        block = labels[start : start + _ROWS_PER_BLOCK]  # (n, K)
        # One random key per entry; in each row the known entries with the smallest keys are kept.
        keys = rng.random(block.shape)
        known = block != -1
        keys[~known] = np.inf
        num_keep = np.round(keep_ratio * known.sum(axis=1)).astype(np.int64)  # (n,)
        rank = keys.argsort(axis=1).argsort(
            axis=1
        )  # (n, K): place of each entry in its row's order
        hidden[start : start + _ROWS_PER_BLOCK][known & (rank >= num_keep[:, None])] = -1
    return hidden
