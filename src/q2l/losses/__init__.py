"""Multi-label classification losses: asymmetric loss (ASL), its partial-label variant, and BCE.

- `AsymmetricLoss`: Ridnik et al., ICCV 2021 (arXiv 2009.14119), which Query2Label trains with.
- `PartialAsymmetricLoss`: ASL for targets 1 / 0 / -1 (not annotated), after Ben-Baruch et al.,
  CVPR 2022 (arXiv 2110.10955).
- `BCEWithLogitsLoss`: binary cross-entropy on logits with the same reductions; -1 targets ignored.

Written from the formulas of Alibaba-MIIL/ASL and PartialLabelingCSL; every loss runs in float32
outside autocast (fp16 underflows ASL's eps into NaN), and `reduction` makes the value independent
of the batch size. docs/losses.md has the formulas and how they differ from the reference code.
"""

from q2l.losses.asymmetric import AsymmetricLoss, BCEWithLogitsLoss
from q2l.losses.partial import PartialAsymmetricLoss, read_class_priors

__all__ = ["AsymmetricLoss", "BCEWithLogitsLoss", "PartialAsymmetricLoss", "read_class_priors"]
