"""Keep an installed optional package out of imports that do not need it.

timm.utils imports wandb whenever it is installed (for timm's own training script, which q2l
does not use): 0.6-1.4 s of every command's start on a 2-core machine, measured with
`make install`'s extras. The commands hide wandb until q2l's W&B logger asks for it.
"""

from __future__ import annotations

import sys

DEFERRED = ("wandb",)


def defer_optional_imports() -> None:
    """Make `import wandb` fail fast (ImportError) until `allow_import("wandb")`; an already
    imported package is left as it is."""
    for name in DEFERRED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def allow_import(name: str) -> None:
    """Undo defer_optional_imports for `name`, so that the next import finds the package (a name
    not deferred is left alone)."""
    if name in DEFERRED and name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]
