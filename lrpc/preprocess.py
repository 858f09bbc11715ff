"""Model inputs from files: images (resized, cropped, normalized), .npy/.npz tensors, and the preprocessing options
that ``lrpc explain``, ``lrpc inspect`` and ``lrpc check`` share.

Images are read with Pillow (``pip install 'lrpc[image]'``), converted to the model's channel count (1:
grayscale, 3: RGB), resized so that they cover the target size (the shorter side fits), center-cropped to
it, scaled to [0, 1] and normalized per channel with ``(x - mean) / std``. The model input is NCHW unless
``layout="nhwc"``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .contract import SEED
from .errors import InputError
from .imaging import pil_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class InputSpec:
    """The explained model input: name, dims (None where dynamic), numpy dtype, layout, and for images the
    target ``size`` (H, W) and ``channels`` (None where unknown)."""

    name: str
    dims: list
    dtype: np.dtype
    layout: str = "nchw"

    @property
    def size(self):
        if len(self.dims) != 4:
            return None
        h, w = (self.dims[2], self.dims[3]) if self.layout == "nchw" else (self.dims[1], self.dims[2])
        return (h, w) if h and w else None

    @property
    def channels(self):
        if len(self.dims) != 4:
            return None
        return self.dims[1] if self.layout == "nchw" else self.dims[3]


def model_input(model: onnx.ModelProto, layout: str = "nchw") -> InputSpec:
    """The first graph input that is neither the relevance seed nor an initializer."""
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name == SEED or inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        except Exception:
            dtype = np.dtype(np.float32)
        return InputSpec(inp.name, dims, dtype, layout)
    raise InputError("the model has no input to explain")


def load_image(path, size, channels: int | None = 3, mean=None, std=None, layout: str = "nchw",
               grayscale: bool = False, dtype=np.float32):
    """Read an image file into a model input ``[1, C, H, W]`` (or ``[1, H, W, C]``).

    Returns ``(tensor, shown)``: ``shown`` is the resized and cropped RGB PIL image before normalization
    (for overlays). ``size``: (H, W). ``channels``: 1 or 3 (None: 1 with ``grayscale``, else 3)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected an image file")
    return image_input(_decoded(p, p), size, channels, mean, std, layout, grayscale, dtype, where=p)


def _decoded(file, where):
    """The PIL image of an image file (a path or a binary stream), turned upright by its EXIF orientation."""
    Image = pil_image()
    from PIL import ImageOps

    try:
        with Image.open(file) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except Exception as e:  # UnidentifiedImageError, truncated files, decompression bombs, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{where}: cannot read image ({first})") from None


def image_input(img, size, channels: int | None = 3, mean=None, std=None, layout: str = "nchw",
                grayscale: bool = False, dtype=np.float32, where="image"):
    """:func:`load_image` of an image in memory: a PIL image, a [H, W] / [H, W, C] uint8 array (as Ray Data's
    ``read_images`` gives) or an image file's bytes (as ``read_binary_files`` gives)."""
    Image = pil_image()
    if isinstance(img, (bytes, bytearray, memoryview)):
        img = _decoded(io.BytesIO(img), where)
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (1, 3, 4)):
            raise InputError(f"{where}: expected a [H, W] or [H, W, C] uint8 image array, got {img.dtype} "
                             f"{list(img.shape)}")
        img = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img)
    p = where
    channels = channels or (1 if grayscale else 3)
    if channels not in (1, 3):
        raise InputError(f"{p}: the model input has {channels} channels; images give 1 (grayscale) or 3 (RGB)")
    img = img.convert("L" if channels == 1 or grayscale else "RGB")
    h, w = size
    iw, ih = img.size
    scale = max(h / ih, w / iw)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    if (nw, nh) != (iw, ih):
        img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    img = img.crop((left, top, left + w, top + h))
    a = np.asarray(img, dtype=np.float64) / 255.0
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] != channels:
        a = np.repeat(a, channels, axis=-1)
    a = (a - _per_channel(mean, channels, 0.0, "--mean")) / _per_channel(std, channels, 1.0, "--std")
    if layout == "nchw":
        a = a.transpose(2, 0, 1)
    return a[None].astype(dtype), img.convert("RGB")


def _per_channel(values, channels: int, default: float, what: str) -> np.ndarray:
    if values is None:
        return np.full(channels, default)
    v = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if v.size == 1:
        v = np.full(channels, v[0])
    if v.size != channels:
        raise InputError(f"{what}: {v.size} values given, the model input has {channels} channel(s)")
    if what == "--std" and np.any(v == 0):
        raise InputError("--std: values must be nonzero")
    return v


def load_tensors(path, session) -> dict:
    """Feeds from a ``.npy`` (the first model input) or ``.npz`` (one array: the first input; several:
    one per model input, by name). Float arrays are cast to the input's float type (numpy's default
    float64 into a float32 model); ranks and static dims are checked against the model."""
    from .runtime import NUMPY_TYPES, fits

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        data = np.load(p, allow_pickle=False)
        arrays = dict(data) if isinstance(data, np.lib.npyio.NpzFile) else {session.inputs[0]: data}
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{p}: cannot read tensors (.npy/.npz expected): {first}") from None
    if len(arrays) == 1:
        arrays = {session.inputs[0]: next(iter(arrays.values()))}
    missing = [n for n in session.inputs if n not in arrays]
    if missing:
        raise InputError(f"{p}: no array for model input(s) {', '.join(missing)} (arrays: {', '.join(arrays)})")
    specs = {i.name: i for i in session.session.get_inputs()}
    feeds = {}
    for name in session.inputs:
        a, spec = np.asarray(arrays[name]), specs[name]
        if not fits(spec, a.shape):
            shown = ",".join(str(d) if isinstance(d, int) else "?" for d in spec.shape)
            raise InputError(f"{p}: array for input '{name}' has shape {list(a.shape)}, the model expects [{shown}]")
        if a.ndim and a.shape[0] == 0:
            raise InputError(f"{p}: array for input '{name}' holds no samples")
        want = NUMPY_TYPES.get(spec.type)
        floating = want is not None and np.issubdtype(want, np.floating)
        if floating and np.issubdtype(a.dtype, np.number) and a.dtype != want:
            a = a.astype(want)
        feeds[name] = a
    return feeds


def image_files(folder) -> list[Path]:
    d = Path(folder)
    if not d.exists():
        raise InputError(f"{d}: no such directory")
    if not d.is_dir():
        raise InputError(f"{d}: not a directory")
    files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{d}: no images ({', '.join(IMAGE_SUFFIXES)}) in this directory")
    return files


PRESETS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def normalization(preset: str | None = None, mean=None, std=None) -> tuple:
    """``(mean, std)`` of the image preprocessing: a preset's, or ``mean``/``std`` given together (sequences or
    comma-separated text), or ``(None, None)`` for none."""
    mean, std = _floats(mean, "--mean"), _floats(std, "--std")
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"--preset: unknown preset '{preset}' (known: {', '.join(PRESETS)})")
        if mean is not None or std is not None:
            raise InputError("--mean/--std cannot be combined with --preset")
        mean, std = (list(v) for v in PRESETS[preset])
    if (mean is None) != (std is None):
        raise InputError("--mean and --std go together")
    if (std is not None and not all(v > 0 for v in std)
            or mean is not None and not all(abs(v) < float("inf") for v in mean)):
        raise InputError(f"--mean/--std: finite means and positive standard deviations expected, got {mean} / {std}")
    return mean, std


def _floats(values, what: str):
    if values is None:
        return None
    if isinstance(values, str):
        try:
            return [float(v) for v in values.split(",")]
        except ValueError:
            raise InputError(f"{what}: expected comma-separated numbers, got '{values}'") from None
    return [float(v) for v in np.atleast_1d(values)]


def image_size(size) -> tuple | None:
    """(H, W) from ``"H,W"``, ``"S"``, an int or a pair; None stays None."""
    if size is None:
        return None
    if isinstance(size, str):
        try:
            values = [int(v) for v in size.split(",")]
        except ValueError:
            values = []
    else:
        values = [int(v) for v in np.atleast_1d(size)]
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise InputError(f"--size: expected H,W (two positive integers), got '{size}'")
    return tuple(values)


def image_inputs(model: onnx.ModelProto, image, preset: str | None = None, mean=None, std=None, size=None,
                 grayscale: bool = False, layout: str = "nchw") -> dict:
    """``{input name: tensor}`` of one image file for ``model``'s first input, preprocessed as ``lrpc explain``
    does (``size`` where the model's spatial dims are dynamic)."""
    spec = model_input(model, layout)
    mean, std = normalization(preset, mean, std)
    hw = spec.size or image_size(size)
    if hw is None:
        raise InputError(f"model input '{spec.name}' has no static image size: give --size H,W")
    tensor, _ = load_image(image, hw, spec.channels, mean, std, layout, grayscale, spec.dtype)
    return {spec.name: tensor}
