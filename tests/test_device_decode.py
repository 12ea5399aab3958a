"""q2l.data.device_decode on the CPU: decoding, augmentation and a training run with
dataset.decode=device (on CUDA the same code decodes with nvJPEG; scripts/gpu_check.py runs it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException
from PIL import Image

from q2l.data import device_decode
from q2l.data.dataset import BadImageError, MultiLabelImageDataset, load_rgb
from q2l.data.device_decode import (
    DeviceAugment,
    EncodedBatch,
    EncodedImages,
    decode_batch,
    official_randaugment,
)
from q2l.data.loader import build_loader
from q2l.data.randaugment import OPERATIONS, OfficialRandAugment, apply_operation
from q2l.data.transforms import build_eval_transform
from q2l.training.run import train

CPU = torch.device("cpu")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three 80×60 JPEGs and one PNG of smooth random structure, and their multi-hot labels."""
    folder = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    paths = []
    for index in range(4):
        coarse = generator.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((80, 60), Image.BICUBIC)
        path = folder / (f"{index}.png" if index == 3 else f"{index}.jpg")
        image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)
        paths.append(path)
    labels = np.array([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=np.int8)
    return MultiLabelImageDataset(paths, labels, ["a", "b"])


def _batch(dataset: MultiLabelImageDataset) -> tuple[EncodedBatch, torch.Tensor]:
    loader = build_loader(EncodedImages(dataset), batch_size=len(dataset), train=False)
    return next(iter(loader))


def test_the_loader_hands_over_files_and_targets(images):
    batch, targets = _batch(images)
    assert isinstance(batch, EncodedBatch) and len(batch) == 4
    assert batch.data[0].dtype == torch.uint8 and batch.data[0].dim() == 1
    assert batch.names[3].endswith("3.png")
    assert torch.equal(targets, torch.from_numpy(images.labels).float())


def test_decoded_images_equal_pils_within_decoder_rounding(images):
    decoded = decode_batch(_batch(images)[0], CPU)
    for path, image in zip(images.image_paths, decoded, strict=True):
        reference = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
        assert image.shape == reference.shape == (3, 60, 80)
        difference = (image.int() - reference.int()).abs()
        assert difference.float().mean() < 0.5 and difference.max() <= 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_applies_it(orientation, images, tmp_path):
    """nvJPEG ignores EXIF orientation, so q2l applies it itself, on every device."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"oriented_{orientation}.jpg"
    Image.open(images.image_paths[0]).save(path, quality=95, exif=exif)
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
    (image,) = decode_batch(EncodedBatch([data], [str(path)]), CPU)
    reference = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
    assert image.shape == reference.shape
    assert (image.int() - reference.int()).abs().float().mean() < 0.5


def test_a_file_that_does_not_decode_is_named(images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images.image_paths[0].read_bytes()[:200])
    batch = EncodedBatch(
        [torch.frombuffer(bytearray(broken.read_bytes()), dtype=torch.uint8)], [str(broken)]
    )
    with pytest.raises(BadImageError, match="broken.jpg"):
        decode_batch(batch, CPU)


def test_without_augmentation_the_device_path_gives_the_eval_transforms_images(images):
    batch, targets = _batch(images)
    augment = DeviceAugment(CPU, 32, MEAN, STD, channels_last=True)
    output, output_targets = augment(batch, targets)
    assert output.shape == (4, 3, 32, 32) and output.dtype == torch.float32
    assert output.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(output_targets, targets)
    transform = build_eval_transform(32, MEAN, STD)
    reference = torch.stack([transform(load_rgb(path)) for path in images.image_paths])
    # One uint8 level is 1/(255·std) ≈ 0.018 after normalisation.
    assert (output - reference).abs().mean() < 0.02


def test_augmentation_follows_the_recipe_and_the_seed(images):
    batch, targets = _batch(images)
    options = {"hflip": 0.5, "scale": (0.5, 1.0), "cutout_factor": 0.5, "randaugment": True}
    augment = DeviceAugment(CPU, 32, MEAN, STD, randaugment_policy="official", **options)
    torch.manual_seed(3)
    first, _ = augment(batch, targets)
    torch.manual_seed(3)
    again, _ = augment(batch, targets)
    plain, _ = DeviceAugment(CPU, 32, MEAN, STD)(batch, targets)
    assert torch.equal(first, again) and not torch.equal(first, plain)
    torchvision_policy = DeviceAugment(CPU, 32, MEAN, STD, randaugment=True)
    assert torchvision_policy(batch, targets)[0].shape == (4, 3, 32, 32)


def test_timm_policies_and_random_erasing_need_the_worker_pipeline():
    with pytest.raises(ValueError, match="decode=workers"):
        DeviceAugment(CPU, 32, MEAN, STD, auto_augment="rand-m9-mstd0.5")
    with pytest.raises(ValueError, match="decode=workers"):
        DeviceAugment(CPU, 32, MEAN, STD, random_erasing=0.25)


def test_the_tensor_randaugment_draws_what_the_pil_policy_draws(monkeypatch):
    drawn = {"pil": [], "tensor": []}
    monkeypatch.setattr(
        "q2l.data.randaugment.apply_operation",
        lambda image, *args: drawn["pil"].append(args) or image,
    )
    monkeypatch.setattr(
        device_decode,
        "_apply_operation",
        lambda image, *args: drawn["tensor"].append(args) or image,
    )
    for seed in range(20):
        torch.manual_seed(seed)
        OfficialRandAugment()(Image.new("RGB", (8, 8)))
        torch.manual_seed(seed)
        official_randaugment(torch.zeros(3, 8, 8, dtype=torch.uint8))
    assert drawn["tensor"] == drawn["pil"] and len(drawn["pil"]) > 10


# Mean |difference| per operation (uint8 levels), tensor against PIL, on a smooth 64×48 image:
# colour operations agree to rounding; geometric ones differ at edges (bilinear vs bicubic shear).
OPERATION_TOLERANCE = {"shear_x": 3, "shear_y": 3}


@pytest.mark.parametrize("name", OPERATIONS)
def test_each_tensor_operation_matches_the_pil_one(name, images):
    image = load_rgb(images.image_paths[0]).resize((64, 48))
    tensor = torch.from_numpy(np.asarray(image)).permute(2, 0, 1).contiguous()
    for level, sign in ((3, 1), (9, -1)):
        torch.manual_seed(0)  # cutout's centre
        reference = np.asarray(apply_operation(image, name, level, sign)).astype(np.int32)
        torch.manual_seed(0)
        result = device_decode._apply_operation(tensor, name, level, sign)
        difference = np.abs(result.permute(1, 2, 0).numpy().astype(np.int32) - reference)
        assert difference.mean() <= OPERATION_TOLERANCE.get(name, 1.0), (name, level, sign)


@pytest.mark.slow
def test_a_run_trains_with_device_decoding(tiny_cfg, tmp_path):
    summary = train(tiny_cfg("trainer.epochs=1", "dataset.decode=device"), tmp_path / "run")
    assert summary["status"] == "completed" and summary["best"]["mAP"] > 0


def test_an_unknown_decode_choice_is_refused_at_composition(tiny_cfg):
    with pytest.raises(ConfigCompositionException, match="gpu"):
        tiny_cfg("dataset.decode=gpu")


def test_an_image_over_max_image_pixels_is_refused_before_it_is_decoded(images):
    limited = MultiLabelImageDataset(
        images.image_paths, images.labels, images.class_names, max_image_pixels=80 * 60 - 1
    )
    with pytest.raises(BadImageError, match="max_image_pixels"):
        EncodedImages(limited)[0]
