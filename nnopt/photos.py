"""Natural photographs available offline, cut into ImageNet-style crops for calibration and fidelity.

Sources, in this order, whichever are installed (nothing is downloaded):
- scikit-learn's two sample photographs (``china.jpg``, ``flower.jpg``; scikit-learn is a core
  dependency, reading JPEG needs Pillow: the ``images`` extra);
- the colour photographs that scikit-image ships in its package (astronaut, cat, coffee, rocket,
  motorcycles, ...): only the image files are read, with Pillow; scikit-image is never imported;
- on request (``sources`` naming ``tuxpaint``), the photographs among Tux Paint's stamps, from the Debian package
  ``tuxpaint-stamps-default``: about 120 cut-out photographs of animals, plants, food, vehicles and tools,
  each laid on a grey square, the objects an ImageNet classifier is made for;
- any folder of images the caller names.

:func:`photo_splits` assigns whole photographs to either the fitting split (calibration, recovery)
or the held-out split, so that no held-out crop shares pixels with what the optimizer saw; with
fewer than two photographs it refuses rather than leak.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from nnopt.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# scikit-image's bundled colour photographs of everyday scenes (its grayscale, synthetic and scientific
# images — microscopy, retina, deep sky — are left out: they are not the natural images a classifier serves)
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SOURCES = ("sklearn", "skimage", "tuxpaint")
DEFAULT_SOURCES = ("sklearn", "skimage")
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")  # Debian: apt-get install tuxpaint-stamps-default
# a stamp is taken as a photograph when its opaque pixels hold this many colours at 6 bits per channel;
# drawings and clip art hold a few hundred
PHOTO_COLOURS = 2000
STAMP_MIN_SIDE = 128
STAMP_BACKGROUND = (124, 116, 104)  # ImageNet's mean colour, so the background normalizes to about zero


@dataclasses.dataclass(frozen=True)
class Photo:
    name: str
    pixels: np.ndarray  # (height, width, 3) uint8 RGB


def offline_photos(folder: str | Path | None = None, sources: Sequence[str] = DEFAULT_SOURCES) -> list[Photo]:
    """Every photograph the named installed ``sources`` (and ``folder``) hold, in a fixed order."""
    if isinstance(sources, str):
        sources = (sources,)
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise ConfigError(f"unknown photo source(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}")
    photos = []
    if "sklearn" in sources:
        photos += _sklearn_photos()
    if "skimage" in sources:
        photos += _skimage_photos()
    if "tuxpaint" in sources:
        photos += stamp_photos()
    if folder is not None:
        photos += _folder_photos(Path(folder))
    if not photos:
        raise ConfigError("no photographs found: install Pillow (pip install 'nnopt[images]') or name a folder")
    return photos


def stamp_photos(root: str | Path = TUXPAINT_STAMPS) -> list[Photo]:
    """The photographs among Tux Paint's stamps under ``root``, each centred on a grey square 15% larger.

    Left out: the ``symbols`` folder and any ``cartoon`` folder, stamps smaller than 128 pixels a side, copies
    of a stamp already taken, and drawings with fewer than :data:`PHOTO_COLOURS` colours (a few shaded
    drawings pass; some small photographs do not).
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"Tux Paint stamps not found at {root}: apt-get install tuxpaint-stamps-default")
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("reading Tux Paint stamps needs Pillow: pip install 'nnopt[images]'") from None
    photos, seen = [], set()
    for path in sorted(root.rglob("*.png")):
        relative = path.relative_to(root)
        if relative.parts[0] == "symbols" or "cartoon" in relative.parts:
            continue
        try:
            with Image.open(path) as image:
                stamp = image.convert("RGBA")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read stamp {path}: {exc}") from None
        rgba = np.asarray(stamp)
        digest = hashlib.sha256(rgba.tobytes()).digest()  # one photograph filed in two folders is one scene
        if min(stamp.size) < STAMP_MIN_SIDE or digest in seen or not _is_photograph(rgba):
            continue
        seen.add(digest)
        side = int(max(stamp.size) * 1.15)
        canvas = Image.new("RGBA", (side, side), (*STAMP_BACKGROUND, 255))
        canvas.alpha_composite(stamp, ((side - stamp.size[0]) // 2, (side - stamp.size[1]) // 2))
        photos.append(Photo(relative.as_posix(), np.asarray(canvas.convert("RGB"))))
    return photos


def _is_photograph(rgba: np.ndarray) -> bool:
    opaque = (rgba[..., :3][rgba[..., 3] > 128] // 4).astype(np.int32)
    codes = (opaque[:, 0] << 12) | (opaque[:, 1] << 6) | opaque[:, 2]
    return len(np.unique(codes)) >= PHOTO_COLOURS


def _sklearn_photos() -> list[Photo]:
    try:
        from sklearn.datasets import load_sample_images

        bunch = load_sample_images()
    except ImportError:  # Pillow missing: scikit-learn needs it to decode its JPEGs
        return []
    return [Photo(Path(name).name, np.asarray(img)) for name, img in zip(bunch.filenames, bunch.images)]


def _skimage_photos() -> list[Photo]:
    spec = importlib.util.find_spec("skimage")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return [photo for name in SKIMAGE_PHOTOS if (data / name).is_file() for photo in _read(data / name)]


def _folder_photos(folder: Path) -> list[Photo]:
    if not folder.is_dir():
        raise ConfigError(f"photo folder {folder} is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"photo folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return [photo for path in files for photo in _read(path)]


def _read(path: Path) -> list[Photo]:
    try:
        from PIL import Image
    except ImportError:
        return []
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read image {path}: {exc}") from None
    if min(pixels.shape[:2]) < 32:
        return []
    return [Photo(path.name, pixels)]


def random_crops(photos: Sequence[Photo], count: int, size: int = 224, seed: int = 0,
                 scale: tuple[float, float] = (0.25, 1.0)) -> torch.Tensor:
    """``count`` random-resized crops (area fraction ``scale``, aspect 3/4..4/3, random flip), resized to
    ``size``×``size`` and normalized with ImageNet's mean and std: (count, 3, size, size) float32."""
    if not photos:
        raise ConfigError("random_crops needs at least one photograph")
    if count < 1 or size < 8:
        raise ConfigError(f"random_crops: count must be >= 1 and size >= 8, got {count} and {size}")
    rng = np.random.default_rng(seed)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = torch.empty(count, 3, size, size)
    for i in range(count):
        pixels = photos[i % len(photos)].pixels
        h, w = pixels.shape[:2]
        area = h * w * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        ch = int(min(h, max(8, round((area / aspect) ** 0.5))))
        cw = int(min(w, max(8, round((area * aspect) ** 0.5))))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = torch.from_numpy(pixels[top:top + ch, left:left + cw].copy()).permute(2, 0, 1)
        crop = torch.nn.functional.interpolate(
            crop[None].float() / 255, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[0]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        out[i] = (crop.clamp(0, 1) - mean) / std
    return out


def _scene(name: str) -> str:
    """Photographs of one scene share this key: a stereo pair, or a stamp and its mirrored copy."""
    path = Path(name)
    for side in ("_left", "_right", "_mirror"):
        if path.stem.endswith(side):
            return (path.parent / path.stem[: -len(side)]).as_posix()
    return (path.parent / path.stem).as_posix()


@dataclasses.dataclass(frozen=True)
class PhotoSplits:
    """Crops for fitting (calibration, recovery) and held-out crops from other photographs."""

    fit: torch.Tensor
    held_out: torch.Tensor
    fit_photos: tuple[str, ...]
    held_out_photos: tuple[str, ...]

    def describe(self) -> str:
        return (f"{len(self.fit)} fitting crops from {', '.join(self.fit_photos)}; {len(self.held_out)} held-out "
                f"crops from {', '.join(self.held_out_photos)} (whole photographs held out)")


def photo_splits(fit: int = 256, held_out: int = 500, size: int = 224, seed: int = 0,
                 folder: str | Path | None = None, sources: Sequence[str] = DEFAULT_SOURCES) -> PhotoSplits:
    """Whole scenes alternate between the fitting and held-out sides; crops are cut from each side.

    Photographs of one scene (scikit-image's ``motorcycle_left``/``motorcycle_right`` stereo pair) stay on
    one side, so no held-out crop shows a scene the optimizer saw.
    """
    photos = offline_photos(folder, sources)
    scenes: dict[str, list[Photo]] = {}
    for photo in photos:
        scenes.setdefault(_scene(photo.name), []).append(photo)
    groups = list(scenes.values())
    if len(groups) < 2:
        raise ConfigError(f"photo_splits needs photographs of two or more scenes to hold some out, found {len(groups)}")
    fitting = [p for group in groups[0::2] for p in group]
    holding = [p for group in groups[1::2] for p in group]
    return PhotoSplits(
        random_crops(fitting, fit, size, seed), random_crops(holding, held_out, size, seed + 1),
        tuple(p.name for p in fitting), tuple(p.name for p in holding),
    )
