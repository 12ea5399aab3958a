"""The commands: one thin module each. A command composes its config, calls the library and
turns what went wrong into an exit status; nothing imports these modules.

Importing this package loads the libraries every command needs with Python's cyclic garbage
collector paused. Importing torch, torchvision (which pulls in torch._dynamo and sympy) and timm
creates a few hundred thousand long-lived objects, and the collector, triggered by the allocations,
walks the growing heap again and again and frees nothing: about 1 s of a command's 4-5 s of
start-up CPU on a 2-core machine (measured with `import q2l.cli.train`, 8 runs each: median 3.7
vs 4.7 s). The objects are then frozen (`gc.freeze`), so that later collections, during training
and in forked DataLoader workers, skip them instead of walking (and copying) them.
"""

import gc

from q2l.utils.optional_imports import defer_optional_imports

defer_optional_imports()


def _load_shared_libraries() -> None:
    """Import what every command imports anyway, with the collector paused."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        import hydra  # noqa: F401
        import timm  # noqa: F401
        import torch  # noqa: F401
        import torchvision  # noqa: F401

        import q2l.config  # noqa: F401  (its schemas import the losses, models and optimizers)
    finally:
        if was_enabled:
            gc.enable()
    gc.freeze()


_load_shared_libraries()
