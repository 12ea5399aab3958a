"""Multi-label classification metrics: pure functions of gathered (N, K) score and target tensors.

N images, K classes. `scores` are per-class confidences (probabilities wherever a threshold is
applied); `targets` hold 1 (positive), 0 (negative) or -1 (not annotated). A -1 entry is dropped
from its class, as if that image were missing from that column, in every metric here.

Two average precisions are offered because the literature reports both under the name "mAP":
- `average_precision`: non-interpolated AP, identical to sklearn's `average_precision_score` and to
  torchmetrics' `MultilabelAveragePrecision` (tied scores form one threshold). ASL and ML-Decoder
  report this one.
- `voc_average_precision`: all-point interpolated VOC AP, the official Query2Label `voc_mAP`
  (borrowed there from SSGRL). It is never smaller than the non-interpolated AP.
Both rank every column with one radix sort of integer keys made from the score bits and then only
touch the positives: a COCO-val-sized evaluation (40,137 × 80) is several times faster than
sklearn's per-class loop or torchmetrics' exact AP (docs/performance.md). The functions run with one
intra-op thread (`single_threaded`): every step is a memory-bound pass or a chain of small per-class
operations, which extra threads barely speed up and stall badly when the cores are busy.

Thresholded metrics follow ML-GCN and the Query2Label paper: CP and CR are per-class means, CF1 =
2·CP·CR/(CP+CR) (not the mean of per-class F1, which ASL's validate.py reports), and OP/OR/OF1 pool
the counts over all classes. The top-3 variants (`*_top3`) follow the literature's convention too,
ML-GCN's code (`overall_topk`), which the published tables use: an image predicts a class when it
is among its 3 highest scores AND its score passes the threshold. Predicting all three whatever
their scores (what q2l reported as `*_top3` before; the checkpoint format's upgrade renames such
old records, q2l.training.checkpoint_format) is kept as `*_top3_all`. `compute_metrics` gathers
everything for a report.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor

_COUNTING_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1")
# A top-k key as records before the literature's convention wrote it: name, k, EMA suffix.
# Score dtypes that float32 holds exactly, so ranking them as float32 keeps every tie.
_FLOAT32_EXACT = (torch.float16, torch.bfloat16, torch.float32)
# PyTorch's CPU sort radix-sorts 1-D integer tensors from this length on (at::internal::GRAIN_SIZE).
_RADIX_SORT_MIN_LENGTH = 32768
_INT32_MIN = -(2**31)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run the enclosed PyTorch CPU work on one intra-op thread, then restore the thread count.

    Usable as a decorator. Measured on a 2-core machine (docs/performance.md): two threads made
    the COCO-sized AP 1.4× faster when the other core was idle, and 50-100× slower (5-10 s
    instead of 0.1 s) while another process kept it busy, as OpenMP's workers wait for a core at
    every parallel operation. The count is process-wide: work on other Python threads runs on
    one thread meanwhile.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@single_threaded()
def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Non-interpolated average precision of every class.

    AP = Σ_n (R_n − R_{n−1}) · P_n over the distinct score thresholds n, taken from the highest
    score down, which is sklearn's `average_precision_score` exactly, ties included: images with
    equal scores enter the ranking together, so each positive in a tie group gets the precision
    measured after the whole group.

    Args:
        scores: (N, K) confidences, any real dtype; counts and ratios are taken in float64.
        targets: (N, K) with values in {-1, 0, 1}; -1 entries are ignored.

    Returns:
        (K,) float64 AP in [0, 1]; NaN for a class with no annotated positive.
    """
    return _average_precision(_rank(*_validate(scores, targets)))


@single_threaded()
def voc_average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """All-point interpolated VOC average precision of every class, as Query2Label's `voc_mAP`.

    The precision curve is replaced by its monotone envelope (precision at rank i becomes the best
    precision at any rank ≥ i) and AP = Σ Δrecall · envelope. Like the official code, the ranking is
    the sort order, not a grouping of tied scores: equal scores keep their input order (a stable
    descending sort), so with ties the result depends on image order. The official code uses
    numpy's unstable argsort and counts -1 targets as negatives; here the order is reproducible and
    -1 entries are ignored.

    Args:
        scores: (N, K) confidences, any real dtype.
        targets: (N, K) with values in {-1, 0, 1}; -1 entries are ignored.

    Returns:
        (K,) float64 AP in [0, 1]; NaN for a class with no annotated positive.
    """
    return _voc_average_precision(_rank(*_validate(scores, targets)))


@single_threaded()
def mean_average_precision(
    scores: Tensor, targets: Tensor, interpolated: bool = False
) -> tuple[float, int]:
    """Mean of the per-class AP over the classes that have at least one annotated positive.

    Args:
        scores: (N, K) confidences.
        targets: (N, K) with values in {-1, 0, 1}; -1 entries are ignored.
        interpolated: False for `average_precision` (sklearn), True for `voc_average_precision`
            (Q2L).

    Returns:
        (mAP as a fraction in [0, 1], number of classes left out for having no positive). mAP is NaN
        when every class is left out.
    """
    ranking = _rank(*_validate(scores, targets))
    per_class = _voc_average_precision(ranking) if interpolated else _average_precision(ranking)
    return _mean_over_classes(per_class)


@single_threaded()
def threshold_metrics(
    scores: Tensor, targets: Tensor, threshold: float | Tensor = 0.5
) -> dict[str, float]:
    """Per-class and overall precision, recall and F1 with `scores >= threshold` predicted positive.

    Args:
        scores: (N, K) probabilities (apply the sigmoid before calling).
        targets: (N, K) with values in {-1, 0, 1}; -1 entries are ignored.
        threshold: probability at or above which a class is predicted: one for all classes, or
            (K,) per class (calibrated thresholds, q2l.evaluation.calibration).

    Returns:
        CP, CR, CF1, OP, OR, OF1 as fractions in [0, 1]; see `_counting_metrics` for definitions.
    """
    scores, targets = _validate(scores, targets)
    # No cast: a threshold equal to a score compares equal whatever the two dtypes.
    return _counting_metrics(scores >= torch.as_tensor(threshold, device=scores.device), targets)


@single_threaded()
def topk_metrics(
    scores: Tensor, targets: Tensor, k: int = 3, threshold: float | None = 0.5
) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 where each image predicts those of its k highest-scoring classes
    whose score is at least `threshold` (the literature's top-k, as ML-GCN computes it), or all k
    with `threshold=None`.

    Ties at the k-th score are broken by `torch.topk`'s order.

    Args:
        scores: (N, K) probabilities (confidences of any scale when `threshold` is None).
        targets: (N, K) with values in {-1, 0, 1}; -1 entries are ignored.
        k: most classes predicted per image, 1 ≤ k ≤ K.
        threshold: probability a top-k class must reach to be predicted; None predicts all k.

    Returns:
        The six metrics as fractions in [0, 1]; see `_counting_metrics` for definitions.
    """
    scores, targets = _validate(scores, targets)
    return _counting_metrics(_topk_predictions(scores, k, threshold), targets)


@single_threaded()
def compute_metrics(
    scores: Tensor, targets: Tensor, threshold: float = 0.5, top_k: int = 3
) -> dict[str, float]:
    """Every metric of an evaluation report, in percent.

    Args:
        scores: (N, K) probabilities.
        targets: (N, K) with values in {-1, 0, 1}; -1 entries are ignored.
        threshold: probability for the thresholded metrics.
        top_k: classes predicted per image for the top-k metrics.

    Returns:
        Percentages (0-100): `mAP` (non-interpolated, sklearn), `mAP_voc` (interpolated, official
        Q2L), `CP CR CF1 OP OR OF1` at `threshold`, the same six suffixed `_top{top_k}` (e.g.
        `CF1_top3`: the top_k classes that also pass `threshold`, the literature's convention) and
        suffixed `_top{top_k}_all` (all top_k classes predicted, whatever their score).
        `num_classes_without_positives` is a plain count: those classes are left out of both mAPs.
    """
    scores, targets = _validate(scores, targets)
    ranking = _rank(scores, targets)
    mean_ap, num_without_positives = _mean_over_classes(_average_precision(ranking))
    mean_voc_ap, _ = _mean_over_classes(_voc_average_precision(ranking))
    thresholded = _counting_metrics(scores >= threshold, targets)
    top = _counting_metrics(_topk_predictions(scores, top_k, threshold), targets)
    top_all = _counting_metrics(_topk_predictions(scores, top_k, None), targets)

    report = {"mAP": 100.0 * mean_ap, "mAP_voc": 100.0 * mean_voc_ap}
    report.update({name: 100.0 * value for name, value in thresholded.items()})
    report.update({f"{name}_top{top_k}": 100.0 * value for name, value in top.items()})
    report.update({f"{name}_top{top_k}_all": 100.0 * value for name, value in top_all.items()})
    report["num_classes_without_positives"] = num_without_positives
    return report


def _validate(scores: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes and values; return floating scores (N, K) and int8 targets (N, K).

    Floating scores keep their dtype (the ranking picks its sort by it); others become float64.
    """
    if not isinstance(scores, Tensor) or not isinstance(targets, Tensor):
        raise ValueError("scores and targets must be torch tensors")
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (N, K), got shape {tuple(scores.shape)}")
    if targets.shape != scores.shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} does not match scores shape "
            f"{tuple(scores.shape)}"
        )
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"need at least one sample and one class, got shape {tuple(scores.shape)}")
    if scores.is_complex() or targets.is_complex():
        raise ValueError("scores and targets must be real-valued")
    scores = scores.detach()
    if not scores.is_floating_point():
        scores = scores.to(torch.float64)
    # A NaN has no place in a ranking and would corrupt every metric of its class without a trace.
    if scores.isnan().any():
        raise ValueError("scores contain NaN")
    targets = targets.detach()
    if targets.dtype != torch.bool:
        lowest, highest = torch.aminmax(targets)
        # Written so that NaN targets fail too.
        in_range = bool(lowest >= -1) and bool(highest <= 1)
        if not in_range or (targets.is_floating_point() and (targets != targets.round()).any()):
            raise ValueError("targets must contain only 1 (positive), 0 (negative) or -1 (ignored)")
    return scores, targets.to(torch.int8)


class _Ranking(NamedTuple):
    """Each class's images ranked by descending score, flattened class-major: K blocks of N.

    A flat position p is rank p - c·N (0-based) of class c = p // N.
    sorted_keys: (K, N) int32 (int64 for float64 scores), each row nondecreasing; equal keys in a
        row are that class's tied scores.
    positives, ignored: (M,), (I,) flat positions of annotated positives and of -1 entries,
        ascending.
    classes: (M,) class of each positive.
    first_positive, first_ignored: (K,) index into `positives` / `ignored` where each class starts.
    num_positives: (K,) float64 positives per class.
    """

    sorted_keys: Tensor
    positives: Tensor
    ignored: Tensor
    classes: Tensor
    first_positive: Tensor
    first_ignored: Tensor
    num_positives: Tensor
    num_samples: int

    def precision_at(self, flat_positions: Tensor) -> Tensor:
        """Precision of the ranking cut after flat position p_i, for (M,) positions where p_i lies
        in the class of positive i, at or after it: (M,) float64."""
        # Counting by binary search in the short sorted position lists avoids cumulative sums over
        # all K·N entries; neither count can be 0 since positive i itself is counted.
        true_positives = torch.searchsorted(self.positives, flat_positions, right=True)
        true_positives -= self.first_positive[self.classes]
        ignored = torch.searchsorted(self.ignored, flat_positions, right=True)
        ignored -= self.first_ignored[self.classes]
        annotated = flat_positions - self.classes * self.num_samples + 1 - ignored
        return true_positives.to(torch.float64) / annotated.to(torch.float64)

    def mean_per_class(self, per_positive: Tensor) -> Tensor:
        """Average (M,) per-positive values over each class: (K,) float64, NaN without positives."""
        totals = torch.zeros_like(self.num_positives).index_add_(0, self.classes, per_positive)
        return totals / self.num_positives


def _rank(scores: Tensor, targets: Tensor) -> _Ranking:
    """Sort each column of (N, K) scores by descending score, ties in input order (stable)."""
    num_samples, num_classes = scores.shape
    device = scores.device
    class_starts = torch.arange(num_classes, device=device) * num_samples
    sorted_keys, order = _sort_rows(_descending_keys(scores.T).contiguous())  # (K, N) each
    sorted_targets = targets.T.gather(1, order).reshape(-1)
    # One pass over all K·N entries finds both short lists; negatives are only ever counted.
    not_negative = (sorted_targets != 0).nonzero().squeeze(1)
    not_negative_targets = sorted_targets[not_negative]
    positives = not_negative[not_negative_targets == 1]
    ignored = not_negative[not_negative_targets == -1]
    classes = positives // num_samples
    return _Ranking(
        sorted_keys=sorted_keys,
        positives=positives,
        ignored=ignored,
        classes=classes,
        first_positive=torch.searchsorted(positives, class_starts),
        first_ignored=torch.searchsorted(ignored, class_starts),
        num_positives=torch.bincount(classes, minlength=num_classes).to(torch.float64),
        num_samples=num_samples,
    )


def _descending_keys(values: Tensor) -> Tensor:
    """Signed-integer sort keys that grow as the value falls: (K, N) float -> (K, N) int32, or
    int64 for float64 values. Equal values get equal keys, -0.0 and +0.0 included."""
    if values.dtype in _FLOAT32_EXACT:
        bits, sign_shift = (values.to(torch.float32) + 0.0).view(torch.int32), 31
    else:
        bits, sign_shift = (values + 0.0).view(torch.int64), 63
    # Adding +0.0 above folds -0.0 into +0.0: their bits differ, but sklearn counts them as a tie.
    # IEEE-754 bits order non-negative floats like signed integers and negative floats in
    # reverse, so flipping the value bits of negative floats gives keys that grow with the value;
    # bitwise not (-x - 1, no overflow) then reverses that order.
    magnitude = (1 << sign_shift) - 1
    return ~(bits ^ ((bits >> sign_shift) & magnitude))


def _sort_rows(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Stable ascending sort of each row of integer keys (K, N): sorted keys and order, (K, N)."""
    num_rows, row_length = keys.shape
    long_rows = row_length >= _RADIX_SORT_MIN_LENGTH
    if keys.device.type != "cpu" or (keys.dtype != torch.int32 and not long_rows):
        return keys.sort(dim=-1, stable=True)  # a segmented sort on accelerators
    # On CPU PyTorch radix-sorts 1-D integer tensors of at least _RADIX_SORT_MIN_LENGTH entries and
    # comparison-sorts anything else, rows of a 2-D tensor included.
    if not long_rows:
        # Short rows: one sort of all K·N keys, each prefixed with its row in the high bits.
        rows = torch.arange(num_rows).unsqueeze(1)
        wide_keys = (keys.to(torch.int64) - _INT32_MIN) + (rows << 32)
        wide_keys, flat_order = wide_keys.reshape(-1).sort(stable=True)
        sorted_keys = ((wide_keys & 0xFFFFFFFF) + _INT32_MIN).to(torch.int32).reshape(num_rows, -1)
        return sorted_keys, flat_order.reshape(num_rows, -1) - rows * row_length
    # Long rows: one radix sort per row. A row of 32-bit keys with its order (40k images: under
    # 1 MB) stays in cache while it is sorted: 2.5× faster than one sort of row-prefixed keys.
    sorted_keys = torch.empty_like(keys)
    order = torch.empty(keys.shape, dtype=torch.int64)
    for row in range(num_rows):
        torch.sort(keys[row], stable=True, out=(sorted_keys[row], order[row]))
    return sorted_keys, order


def _average_precision(ranking: _Ranking) -> Tensor:
    """Non-interpolated AP per class (K,): each positive scores the precision at the end of its tie
    group, the last position holding its key."""
    group_last = torch.empty_like(ranking.positives)
    bounds = [*ranking.first_positive.tolist(), ranking.positives.numel()]
    # A binary search in each class's own row of 32-bit keys: cheaper than widening all K·N keys
    # to 64 bits to make one globally sorted array, and it works for 64-bit keys unchanged.
    for label, (begin, end) in enumerate(itertools.pairwise(bounds)):
        if begin < end:
            keys = ranking.sorted_keys[label]
            start = label * ranking.num_samples
            ranks = ranking.positives[begin:end] - start
            group_last[begin:end] = torch.searchsorted(keys, keys[ranks], right=True) + (start - 1)
    return ranking.mean_per_class(ranking.precision_at(group_last))


def _voc_average_precision(ranking: _Ranking) -> Tensor:
    """Interpolated VOC AP per class (K,) over the stable sort order."""
    precision = ranking.precision_at(ranking.positives)
    # Recall moves only at positives, and precision only rises at positives, so the envelope at a
    # positive is the best precision at that positive or any later one of its class. Laid out as
    # (K, most positives of any class), zero-padded, that is a reversed running maximum per row.
    rank_in_class = torch.arange(precision.numel(), device=precision.device)
    rank_in_class -= ranking.first_positive[ranking.classes]
    most_positives = max(int(ranking.num_positives.max()), 1)
    padded = precision.new_zeros(ranking.num_positives.numel(), most_positives)
    padded[ranking.classes, rank_in_class] = precision
    envelope = padded.flip(-1).cummax(-1).values.flip(-1)
    return ranking.mean_per_class(envelope[ranking.classes, rank_in_class])


def _mean_over_classes(per_class: Tensor) -> tuple[float, int]:
    """Mean of (K,) per-class values skipping NaN classes, and how many were skipped."""
    has_positive = ~per_class.isnan()
    num_left_out = int((~has_positive).sum())
    if num_left_out == per_class.numel():
        return math.nan, num_left_out
    return float(per_class[has_positive].mean()), num_left_out


def _topk_predictions(scores: Tensor, k: int, threshold: float | None) -> Tensor:
    """(N, K) boolean mask of each row's k highest scores, keeping only those at or above
    `threshold` unless it is None."""
    num_classes = scores.shape[1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be between 1 and the number of classes ({num_classes}), got {k}")
    top_classes = scores.topk(k, dim=1).indices
    predicted = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top_classes, True)
    return predicted if threshold is None else predicted & (scores >= threshold)


def _counting_metrics(predicted: Tensor, targets: Tensor) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 from (N, K) boolean predictions and {-1, 0, 1} targets.

    CP = mean over all classes of tp/(tp+fp), a class with no prediction counting as 0 (as ASL and
    ML-GCN do, so predicting nothing is not rewarded). CR = mean over the classes with at least one
    positive of tp/(tp+fn). CF1 = 2·CP·CR/(CP+CR). OP, OR, OF1 are the same with tp, fp, fn summed
    over classes first. F1 is 0 when precision and recall are both 0; recalls are NaN when no class
    has a positive. Predictions on ignored (-1) entries are not counted.
    """
    positive = targets == 1
    predicted = predicted & (targets != -1)
    true_positives = (predicted & positive).sum(0).to(torch.float64)
    predicted_positives = predicted.sum(0).to(torch.float64)
    class_positives = positive.sum(0).to(torch.float64)

    per_class_precision = true_positives / predicted_positives.clamp_min(1.0)
    has_positive = class_positives > 0
    per_class_recall = true_positives[has_positive] / class_positives[has_positive]
    class_precision = float(per_class_precision.mean())
    class_recall = float(per_class_recall.mean()) if has_positive.any() else math.nan

    total_true_positives = float(true_positives.sum())
    total_predicted = float(predicted_positives.sum())
    total_positives = float(class_positives.sum())
    overall_precision = total_true_positives / total_predicted if total_predicted > 0 else 0.0
    overall_recall = total_true_positives / total_positives if total_positives > 0 else math.nan

    values = (
        class_precision,
        class_recall,
        _f1(class_precision, class_recall),
        overall_precision,
        overall_recall,
        _f1(overall_precision, overall_recall),
    )
    return dict(zip(_COUNTING_KEYS, values, strict=True))


def _f1(precision: float, recall: float) -> float:
    """Harmonic mean; 0 when both are 0, NaN when either is NaN."""
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)
