"""The embedded demo data set: handwritten digits composed onto canvases, saved in COCO 2014 layout.

`build_digits_coco` pastes one to four of scikit-learn's bundled 8×8 handwriting scans
(`sklearn.datasets.load_digits`, 1,797 real scans from 43 writers, shipped inside the wheel) onto
small coloured canvases and writes them exactly where and how MS-COCO 2014 keeps its files:

    root/
      train2014/COCO_train2014_%012d.jpg
      val2014/COCO_val2014_%012d.jpg
      annotations/instances_train2014.json
      annotations/instances_val2014.json
      .q2l-built.json           # marker, written last: the arguments and every file written

so the COCO loader trains on it out of the box, without a download, and is exercised the way real
COCO exercises it: category ids have gaps and are listed out of order, image ids are not row
indices, a few images carry no annotation, and one canvas may hold the same digit twice. The
multi-label target of a canvas is the set of digits on it.

Validation canvases use only scans that no training canvas uses (`split_digit_scans`), so
validation mAP measures generalisation to unseen handwriting, not recall of pasted pixels.

The build is deterministic (same arguments, byte-identical files), idempotent (a matching marker
returns at once) and crash-safe, and it never touches a folder it did not create: see
`q2l.demo.owned`.
"""

import json
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

from q2l.demo.owned import build_owned_folder, data_dir_hint
from q2l.utils.errors import ConfigError

logger = logging.getLogger(__name__)

# Bump whenever a change here would change the bytes written, so old copies are rebuilt.
FORMAT_VERSION = 1
KIND = "the digits demo data set"

CATEGORY_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Increasing with the digit but with uneven gaps, like COCO's 1..90 for 80 classes: a loader that
# sorts ids gets class index == digit, one that assumes ids are 0..K-1 or 1..K breaks loudly.
CATEGORY_IDS = (1, 3, 4, 7, 9, 12, 15, 16, 18, 21)

_VAL_SCAN_FRACTION = 0.3
# Digit side as a fraction of the canvas side: about 18-26 px on the default 64 px canvas.
_DIGIT_SIZE_FRACTION = (0.28, 0.40)
# Below this the 8×8 scans stop being readable after resampling.
_MIN_DIGIT_SIZE = 8
# Upscaled ink below this opacity is resampling halo, not part of the stroke, for the bbox.
_INK_THRESHOLD = 0.1
_NOISE_STD = 6.0
_JPEG_QUALITY = 95
_SPLITS = ("train", "val")


def build_digits_coco(
    root: str | Path,
    num_train: int = 4000,
    num_val: int = 1000,
    canvas_size: int = 64,
    min_digits: int = 1,
    max_digits: int = 4,
    empty_fraction: float = 0.02,
    seed: int = 0,
) -> Path:
    """Write the digits demo data set in COCO 2014 layout under `root` unless it is already there.

    Each canvas is `canvas_size`² RGB and holds between `min_digits` and `max_digits` digits
    (duplicates allowed), except `round(empty_fraction * count)` canvases per split that hold none
    and have no annotation. Returns `root` as a Path.

    Raises FolderNotOursError (a FileExistsError) if `root` holds anything this function did not
    write, and PermissionError naming `root` and Q2L_DATA_DIR if it cannot be written.
    """
    # Plain Python numbers, so the marker compares equal after a JSON round trip.
    arguments = {
        "format_version": FORMAT_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "canvas_size": int(canvas_size),
        "min_digits": int(min_digits),
        "max_digits": int(max_digits),
        "empty_fraction": float(empty_fraction),
        "seed": int(seed),
    }
    _check_arguments(**{k: v for k, v in arguments.items() if k != "format_version"})
    start = time.perf_counter()
    built = []

    def build(folder: Path) -> None:
        _write_data_set(folder, arguments)
        built.append(folder)

    root = build_owned_folder(root, KIND, arguments, build, hint=data_dir_hint("dataset.root"))
    if built:
        logger.info(
            "wrote digits COCO data set (%d train + %d val canvases of %d px) to %s in %.1f s",
            num_train,
            num_val,
            canvas_size,
            root,
            time.perf_counter() - start,
        )
    return root


def split_digit_scans(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split the 1,797 scan indices into disjoint train and val pools, stratified by digit.

    Returns (train_indices, val_indices), each sorted, with about 30% of every digit's scans in val.
    """
    _, targets = _load_scans()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    train_indices, val_indices = [], []
    for digit in range(len(CATEGORY_NAMES)):
        indices = rng.permutation(np.flatnonzero(targets == digit))
        num_val = round(_VAL_SCAN_FRACTION * len(indices))
        val_indices.append(indices[:num_val])
        train_indices.append(indices[num_val:])
    return np.sort(np.concatenate(train_indices)), np.sort(np.concatenate(val_indices))


def _check_arguments(
    num_train: int,
    num_val: int,
    canvas_size: int,
    min_digits: int,
    max_digits: int,
    empty_fraction: float,
    seed: int,
) -> None:
    if num_train < 1 or num_val < 1:
        raise ConfigError(f"need at least one canvas per split, got {num_train=} {num_val=}")
    if not 1 <= min_digits <= max_digits:
        raise ConfigError(f"need 1 <= min_digits <= max_digits, got {min_digits=} {max_digits=}")
    if not 0.0 <= empty_fraction < 1.0:
        raise ConfigError(f"empty_fraction must be in [0, 1), got {empty_fraction}")
    cell_size = canvas_size // _grid_side(max_digits)
    if cell_size < _MIN_DIGIT_SIZE:
        raise ConfigError(
            f"a {canvas_size} px canvas split for {max_digits} digits leaves {cell_size} px per "
            f"digit; need at least {_MIN_DIGIT_SIZE}: raise canvas_size or lower max_digits"
        )


def _write_data_set(folder: Path, arguments: dict) -> None:
    """Render both splits into `folder`."""
    scans, labels = _load_scans()
    train_pool, val_pool = split_digit_scans(arguments["seed"])
    pools = {"train": train_pool, "val": val_pool}
    counts = {"train": arguments["num_train"], "val": arguments["num_val"]}
    (folder / "annotations").mkdir(parents=True)

    # Val image and annotation ids continue after train's, as in COCO, so the two splits can be
    # merged (trainval) without collisions.
    first_image_id, first_annotation_id = 1, 1
    for split_number, split in enumerate(_SPLITS):
        # One independent stream per split: val's canvases do not shift when num_train changes.
        rng = np.random.default_rng(np.random.SeedSequence([arguments["seed"], 1 + split_number]))
        coco = _render_split(
            folder=folder,
            split=split,
            count=counts[split],
            scans=scans[pools[split]],
            labels=labels[pools[split]],
            first_image_id=first_image_id,
            first_annotation_id=first_annotation_id,
            rng=rng,
            canvas_size=arguments["canvas_size"],
            min_digits=arguments["min_digits"],
            max_digits=arguments["max_digits"],
            empty_fraction=arguments["empty_fraction"],
        )
        path = folder / "annotations" / f"instances_{split}2014.json"
        path.write_text(json.dumps(coco, separators=(",", ":")))
        first_image_id += counts[split]
        first_annotation_id += len(coco["annotations"])


def _render_split(
    folder: Path,
    split: str,
    count: int,
    scans: np.ndarray,
    labels: np.ndarray,
    first_image_id: int,
    first_annotation_id: int,
    rng: np.random.Generator,
    canvas_size: int,
    min_digits: int,
    max_digits: int,
    empty_fraction: float,
) -> dict:
    """Draw `count` canvases from `scans` (N, 8, 8) of digits `labels` (N,) into folder/{split}2014.

    Returns the split's COCO instances dict.
    """
    image_folder = folder / f"{split}2014"
    image_folder.mkdir()
    grid_side = _grid_side(max_digits)
    cell_size = canvas_size // grid_side
    max_size = min(cell_size, round(_DIGIT_SIZE_FRACTION[1] * canvas_size))
    min_size = max(_MIN_DIGIT_SIZE, min(max_size, round(_DIGIT_SIZE_FRACTION[0] * canvas_size)))
    is_empty = np.zeros(count, dtype=bool)
    is_empty[rng.choice(count, size=round(empty_fraction * count), replace=False)] = True

    images, annotations = [], []
    for index in range(count):
        image_id = first_image_id + index
        file_name = f"COCO_{split}2014_{image_id:012d}.jpg"
        num_digits = 0 if is_empty[index] else int(rng.integers(min_digits, max_digits + 1))
        chosen = rng.choice(len(scans), size=num_digits)
        canvas, boxes = _draw_canvas(
            scans=scans[chosen],
            digits=labels[chosen],
            cells=rng.choice(grid_side * grid_side, size=num_digits, replace=False),
            rng=rng,
            canvas_size=canvas_size,
            grid_side=grid_side,
            size_range=(min_size, max_size),
        )
        # 4:4:4 chroma keeps the thin coloured strokes sharp; 4:2:0 smears them at this scale.
        Image.fromarray(canvas).save(image_folder / file_name, quality=_JPEG_QUALITY, subsampling=0)
        images.append(
            {"id": image_id, "file_name": file_name, "width": canvas_size, "height": canvas_size}
        )
        for digit, box in boxes:
            annotations.append(
                {
                    "id": first_annotation_id + len(annotations),
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[digit],
                    "bbox": [float(value) for value in box],
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
            )

    # Listed out of id order, as a reminder that category order in the file means nothing.
    categories = [
        {"id": CATEGORY_IDS[digit], "name": CATEGORY_NAMES[digit], "supercategory": "digit"}
        for digit in rng.permutation(len(CATEGORY_NAMES))
    ]
    info = {
        "description": "q2l digits: scikit-learn handwriting scans composed in COCO 2014 layout",
        "version": str(FORMAT_VERSION),
        "year": 2014,
        "contributor": "q2l",
        "date_created": "2014/01/01",
    }
    return {
        "info": info,
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def _draw_canvas(
    scans: np.ndarray,
    digits: np.ndarray,
    cells: np.ndarray,
    rng: np.random.Generator,
    canvas_size: int,
    grid_side: int,
    size_range: tuple[int, int],
) -> tuple[np.ndarray, list[tuple[int, tuple[int, int, int, int]]]]:
    """Paste scans (N, 8, 8) showing `digits` (N,) into distinct `cells` (N,) of a noisy canvas.

    Returns the (H, W, 3) uint8 canvas and one (digit, (x, y, width, height)) tight ink box per
    pasted scan.
    """
    cell_size = canvas_size // grid_side
    background = rng.uniform(0.0, 90.0, size=3)
    canvas = np.broadcast_to(background, (canvas_size, canvas_size, 3)).copy()
    boxes = []
    for pixels, digit, cell in zip(scans, digits, cells, strict=True):
        size = int(rng.integers(size_range[0], size_range[1] + 1))
        # Jitter inside the cell: digits never overlap yet do not sit on a visible grid.
        left = (cell % grid_side) * cell_size + int(rng.integers(0, cell_size - size + 1))
        top = (cell // grid_side) * cell_size + int(rng.integers(0, cell_size - size + 1))
        colour = rng.uniform(130.0, 255.0, size=3)
        # Scan values run 0..16; as 8-bit grey they resample with PIL's clipped bicubic filter.
        glyph = Image.fromarray(np.round(pixels * (255.0 / 16.0)).astype(np.uint8))
        alpha = np.asarray(glyph.resize((size, size), Image.Resampling.BICUBIC)) / 255.0
        region = canvas[top : top + size, left : left + size]
        region += alpha[..., None] * (colour - region)
        boxes.append((int(digit), _ink_box(alpha, left, top)))
    canvas += rng.normal(0.0, _NOISE_STD, size=canvas.shape)
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8), boxes


def _ink_box(alpha: np.ndarray, left: int, top: int) -> tuple[int, int, int, int]:
    """Tight (x, y, width, height) canvas box around the visible strokes of one pasted glyph."""
    rows = np.flatnonzero((alpha > _INK_THRESHOLD).any(axis=1))
    columns = np.flatnonzero((alpha > _INK_THRESHOLD).any(axis=0))
    if len(rows) == 0:
        return left, top, alpha.shape[1], alpha.shape[0]
    return (
        left + int(columns[0]),
        top + int(rows[0]),
        int(columns[-1] - columns[0] + 1),
        int(rows[-1] - rows[0] + 1),
    )


def _grid_side(max_digits: int) -> int:
    """Side of the square grid with one cell per digit: 2 for up to 4 digits, 3 for up to 9."""
    return int(np.ceil(np.sqrt(max_digits)))


def _load_scans() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 scans as ((N, 8, 8) float values 0..16, (N,) digit labels)."""
    # Imported here, not at the top: scikit-learn takes about a second to import and only this
    # builder needs it, not every module that imports q2l.data.
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target
