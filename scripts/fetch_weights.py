"""Download the pretrained backbone weights that q2l's paper presets name (or any timm backbones)
into a Hugging Face cache folder, for machines without internet (clusters).

    python scripts/fetch_weights.py --cache-dir /shared/hf-cache     # every paper preset's
    python scripts/fetch_weights.py --backbones resnet50 tresnet_l.miil_in1k_448 --cache-dir DIR
    python scripts/fetch_weights.py --list                            # what, whence; no download

Then, where the runs happen (the folder copied there, or on a shared file system):

    export HF_HUB_CACHE=/shared/hf-cache HF_HUB_OFFLINE=1
    python train.py experiment=coco_r101_448 dataset.root=/data/coco   # no backbone.weights

The files are timm's own hub weights (the Hugging Face hub client's cache layout), exactly what a
run with `backbone.pretrained=true` and no `backbone.weights` loads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def preset_backbones() -> dict[str, str]:
    """{paper preset: the timm name of its backbone}, read from conf/experiment/*.yaml."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from q2l.config import CONFIG_DIR

    presets = sorted(
        p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml") if p.stem != "demo"
    )
    found = {}
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for preset in presets:
            found[preset] = compose(
                "train", [*_any_dataset(CONFIG_DIR, preset), f"experiment={preset}"]
            ).backbone.name
    GlobalHydra.instance().clear()
    return found


def _any_dataset(config_dir: str, preset: str) -> list[str]:
    """The own-data set for a preset that picks none (experiment=small is for any data set)."""
    text = (Path(config_dir) / "experiment" / f"{preset}.yaml").read_text()
    return [] if "override /dataset" in text else ["dataset=table"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="*", help="timm names (default: the presets')")
    parser.add_argument("--cache-dir", help="the cache folder (default: HF_HUB_CACHE's)")
    parser.add_argument("--list", action="store_true", help="show what would be fetched, only")
    args = parser.parse_args(argv)
    from q2l.models.backbone import cached_weights, download_weights, hub_cache_dir, hub_source

    if args.cache_dir:
        os.environ["HF_HUB_CACHE"] = str(Path(args.cache_dir).expanduser().resolve())
    wanted = {name: [] for name in args.backbones or []}
    if not args.backbones:
        for preset, name in preset_backbones().items():
            wanted.setdefault(name, []).append(preset)
    failed = 0
    for name, presets in wanted.items():
        repo, _, filenames = hub_source(name)
        used_by = f" (presets: {', '.join(presets)})" if presets else ""
        cached = cached_weights(name)
        if args.list or cached:
            state = f"cached: {cached}" if cached else "not cached"
            print(f"{name}: {repo}/{filenames[0]}{used_by} - {state}")
            continue
        try:
            print(f"{name}: {download_weights(name)}{used_by}")
        except FileNotFoundError as error:
            print(f"{name}: FAILED: {error}", file=sys.stderr)
            failed += 1
    print(f"cache folder: {hub_cache_dir()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
