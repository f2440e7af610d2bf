"""ImageNet classification of image files, and torchvision's ImageNet preprocessing recipe.

The recipe is torchvision's ``ImageClassification`` transform for ResNets: resize the shorter
side to 256 (bilinear, antialiased), center-crop 224x224, scale to [0, 1], normalize with the
ImageNet mean and standard deviation. Resize and crop run in PIL (exactly torchvision's PIL
path); the uint8 -> normalized channels-last step runs through the fused
``fastres.ops.preprocess`` op when it is available and agrees with plain torch on the batch,
and through plain torch otherwise.

Used by ``fastres classify`` and by ``fastres verify`` (for its real photographs).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fastres import _warnings
from fastres.ops._checks import cuda_device_problem

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_SIZE = 256
CROP_SIZE = 224

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                 "bfloat16": "bf16"}


class UserError(Exception):
    """A problem with what the user asked for (bad file, bad option): reported without a
    traceback, exit status 2."""


def parse_dtype(name: str) -> torch.dtype:
    """``fp32`` / ``fp16`` / ``bf16`` (or ``float32``, ``half``, ...) -> ``torch.dtype``."""
    key = DTYPE_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def parse_device(name: str | None) -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from exc
    problem = cuda_device_problem(device)
    if problem is not None:
        raise UserError(f"device {name!r} asked for, but {problem}")
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"unsupported device {name!r}; expected auto, cpu, cuda or cuda:N")
    return device


def class_names(num_classes: int) -> list[str]:
    """ImageNet-1k names for a 1000-class head, ``class N`` otherwise."""
    if num_classes == 1000:
        try:
            from torchvision.models._meta import _IMAGENET_CATEGORIES as names
        except ImportError:
            from fastres.imagenet_classes import IMAGENET_CATEGORIES as names
        return list(names)
    return [f"class {i}" for i in range(num_classes)]


# -- images --------------------------------------------------------------------------------------

def to_pil_rgb(image):
    """A PIL RGB image from a PIL image or an ``HxW`` / ``HxWx{1,3,4}`` array (uint8; uint16
    keeps its top 8 bits; floats in [0, 1] or [0, 255]; other values are a ``ValueError``)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        arr = image
        if not (arr.ndim == 2 or arr.ndim == 3 and arr.shape[2] in (1, 3, 4)):
            raise ValueError(f"expected an HxW or HxWxC image array (C = 1, 3 or 4), got "
                             f"shape {arr.shape}")
        if arr.dtype == np.bool_:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:  # as the same pixels in an image file (see _to_uint8)
            kind = ("F" if arr.dtype.kind == "f" else
                    "I;16" if arr.dtype == np.uint16 else "I")
            arr = _to_uint8(arr, kind)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        image = Image.fromarray(arr)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a NumPy array, got {type(image).__name__}"
                        + (" (convert an HWC tensor with .numpy())"
                           if isinstance(image, Tensor) else ""))
    if image.mode.startswith("I") or image.mode == "F":
        # (Pillow opens 16-bit PNG, PGM and TIFF files in modes I;16 and I: 16-bit data
        # whatever its values)
        image = Image.fromarray(_to_uint8(np.asarray(image), image.mode,
                                          sixteen_bit=image.mode.startswith("I")))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def _to_uint8(arr: np.ndarray, mode: str, sixteen_bit: bool | None = None) -> np.ndarray:
    """16-bit, 32-bit integer and float grayscale as 8 bits (PIL's convert() clips them to
    0..255, which turns a 16-bit photo white and a [0, 1] float one black). 16-bit data keeps
    its top 8 bits, as torchvision's uint16 -> uint8 conversion does. ``sixteen_bit``: the
    integer data is 16-bit whatever its values (an image file's, see :func:`to_pil_rgb`);
    ``None``: when ``mode`` is ``I;16*`` or a value exceeds 255 (an integer array)."""
    a = arr.astype(np.float64)
    if a.size == 0:
        raise ValueError(f"{mode} image has no pixels")
    if not np.isfinite(a).all():
        bad = int(a.size - np.isfinite(a).sum())
        raise ValueError(f"{mode} image has {bad} pixel value(s) that are NaN or infinite "
                         f"(of {a.size}); expected finite values")
    lo, hi = float(a.min()), float(a.max())
    if mode == "F":
        if lo < 0 or hi > 255:
            raise ValueError(f"float image values span [{lo:g}, {hi:g}], expected [0, 1] or "
                             "[0, 255]")
        return np.round(a * (255.0 if hi <= 1.0 else 1.0)).astype(np.uint8)
    if lo < 0 or hi > 65535:
        raise ValueError(f"{mode} image values span [{lo:g}, {hi:g}], expected 16-bit data")
    if sixteen_bit is None:
        sixteen_bit = mode.startswith("I;16") or hi > 255
    if sixteen_bit:
        return (arr.astype(np.int64) >> 8).astype(np.uint8)
    return arr.astype(np.uint8)


def load_image(path: str | os.PathLike):
    """Open an image file as PIL RGB; a missing or unreadable file is a :class:`UserError`."""
    from PIL import Image, UnidentifiedImageError

    from fastres.models import not_a_file

    path = os.fspath(path)
    if not os.path.isfile(path):  # missing, a directory, a FIFO (which PIL would wait on), ...
        raise UserError(not_a_file(path, "image", "an image file"))
    try:
        with Image.open(path) as img:
            img.load()
            w, h = img.size
            if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT:
                # resize-256 makes the short side 256: a 1 x 40000 strip would be 256 x 10M
                raise UserError(f"cannot classify {path!r}: {w}x{h} pixels is too elongated "
                                f"(at most {MAX_ASPECT}:1; ImageNet's recipe resizes the short "
                                "side to 256)")
            return to_pil_rgb(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
            SyntaxError, MemoryError) as exc:
        raise UserError(f"cannot read {path!r} as an image: {exc or type(exc).__name__}") \
            from exc


MAX_ASPECT = 64  # longest side over shortest that load_image takes (256 x 16384 at most)


def resize_center_crop(image, resize: int = RESIZE_SIZE, crop: int = CROP_SIZE) -> np.ndarray:
    """torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` on a PIL image.

    Returns ``[crop, crop, 3]`` uint8 (HWC). The shorter side becomes ``resize`` (the longer
    one ``int(resize * long / short)``, as torchvision computes it), bilinear with PIL's
    antialiasing; the crop offsets are ``int(round((size - crop) / 2))``.
    """
    from PIL import Image

    image = to_pil_rgb(image)
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if new_w < crop or new_h < crop:
        raise UserError(f"image of {w}x{h} is too small for a {crop}x{crop} crop after "
                        f"resizing to {new_w}x{new_h}")
    top = round((new_h - crop) / 2.0)
    left = round((new_w - crop) / 2.0)
    image = image.crop((left, top, left + crop, top + crop))
    return np.asarray(image, dtype=np.uint8).copy()


def normalize_torch(images: Tensor, dtype: torch.dtype = torch.float32,
                    mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """Plain-torch uint8 ``[N, H, W, 3]`` -> normalized ``[N, 3, H, W]`` channels-last ``dtype``.

    Computed in fp32 (``(x / 255 - mean) / std``), then cast: torchvision's ``ToTensor`` +
    ``Normalize`` followed by ``.to(dtype)``.
    """
    return _normalize(images, dtype, *_check_normalize_args(images, dtype, mean, std))


def _normalize(images: Tensor, dtype: torch.dtype, mean: list[float],
               std: list[float]) -> Tensor:
    """:func:`normalize_torch` on arguments :func:`_check_normalize_args` has checked."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    x = (x - m) / s
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def _check_normalize_args(images, dtype, mean, std) -> tuple[list[float], list[float]]:
    """What :func:`normalize_torch` takes: uint8 ``[N, H, W, 3]`` images (as decoders give
    them), a floating-point ``dtype``, 3 means and 3 finite non-zero standard deviations
    (sequences of numbers, NumPy arrays or 1-D tensors). Returns ``mean`` and ``std`` as
    lists of floats."""
    from fastres.ops.preprocess import _floats, finite_nonzero_in_float32

    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"normalize expects uint8 [N, H, W, 3] images, got {got} (float "
                        "images in [0, 1]: torchvision.transforms.v2.functional.normalize)")
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"normalize expects uint8 [N, H, W, 3] images (channels last), got "
                         f"shape {tuple(images.shape)}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"normalize: dtype must be a floating-point torch.dtype, got {dtype!r}")
    mean, std = _floats("mean", mean, "normalize"), _floats("std", std, "normalize")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"normalize: mean and std must have 3 values, got {mean} and {std}")
    if not all(map(finite_nonzero_in_float32, std)):  # (it divides in float32)
        raise ValueError(f"normalize: std values must be finite and non-zero in float32, got "
                         f"{std}")
    return mean, std


def _fused_preprocess():
    try:
        from fastres.ops.preprocess import preprocess
    except Exception:  # not written / not importable yet: plain torch is the fallback
        return None
    return preprocess


_said_fallback: set[str] = set()


def _say_fallback_once(reason: str, kind: str | None = None) -> None:
    """Warn once per ``kind`` of fallback (default: per ``reason``; a reason that carries a
    measured value passes its kind, or each batch would warn again)."""
    if _warnings.first_time(_said_fallback, reason if kind is None else kind):
        _warnings.warn(f"fastres: fused preprocess not used ({reason}); using plain torch")


def normalize(images: Tensor, dtype: torch.dtype = torch.float32,
              mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              prefer_fused: bool = True) -> tuple[Tensor, str]:
    """uint8 ``[N, H, W, 3]`` -> normalized channels-last ``[N, 3, H, W]`` in ``dtype``.

    Uses ``fastres.ops.preprocess`` when it is importable and agrees with
    :func:`normalize_torch` on this batch (relative error within the dtype's rounding);
    otherwise plain torch, said once. Returns ``(tensor, "fused" | "torch")``.
    """
    mean, std = _check_normalize_args(images, dtype, mean, std)
    ref = _normalize(images, dtype, mean, std)
    fused = _fused_preprocess() if prefer_fused else None
    if fused is None:
        return ref, "torch"
    try:
        out = fused(images, "NHWC", mean, std, dtype)
    except Exception as exc:  # the op refused this call: fall back, say so once
        _say_fallback_once(f"{type(exc).__name__}: {exc}")
        return ref, "torch"
    if not isinstance(out, Tensor) or tuple(out.shape) != tuple(ref.shape):
        _say_fallback_once(f"returned shape {getattr(out, 'shape', None)}, expected "
                           f"{tuple(ref.shape)}")
        return ref, "torch"
    err = float(torch.linalg.vector_norm((out.double() - ref.double()).flatten())
                / torch.linalg.vector_norm(ref.double().flatten()).clamp_min(1e-30))
    limit = 1e-5 if dtype == torch.float32 else 1e-2
    if not err <= limit:
        _say_fallback_once(f"disagrees with torchvision's recipe: relative error {err:.2e}",
                           "disagrees")
        return ref, "torch"
    return out.to(dtype).contiguous(memory_format=torch.channels_last), "fused"


def imagenet_batch(images: Sequence, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32, prefer_fused: bool = True
                   ) -> tuple[Tensor, str]:
    """PIL images / arrays -> a normalized ``[N, 3, 224, 224]`` channels-last batch.

    Returns ``(batch, "fused" | "torch")`` (which implementation normalized it).
    """
    arrays = [resize_center_crop(img) for img in images]
    u8 = torch.from_numpy(np.stack(arrays)).to(device)
    return normalize(u8, dtype, prefer_fused=prefer_fused)


# -- classification ------------------------------------------------------------------------------

@dataclass
class Prediction:
    path: str
    topk: list[tuple[int, str, float]]  # (class index, name, probability)


def guess_architecture(state_dict) -> str | None:
    """Which of fastres's models a state_dict fits (keys and shapes, any ``num_classes``)."""
    from fastres import models

    want = {k: tuple(v.shape) for k, v in state_dict.items()
            if hasattr(v, "shape") and not k.startswith("fc.")}
    for name in models.MODEL_NAMES:
        with torch.device("meta"):
            sd = models.get_model(name).state_dict()
        have = {k: tuple(v.shape) for k, v in sd.items() if not k.startswith("fc.")}
        if have == want:
            return name
    return None


def describe_mismatch(model_name: str, state_dict, source: str) -> str:
    """A short message for a checkpoint that does not fit ``model_name``."""
    from fastres import models

    with torch.device("meta"):
        expected = models.get_model(model_name).state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]

    def shape(k):
        return list(getattr(state_dict[k], "shape", ()))

    # the number of classes is the checkpoint's own (fc's first dimension: shown as N), but
    # fc's input features and its bias's length must fit
    classes = shape("fc.weight")[:1] if "fc.weight" in state_dict else []
    want = {k: list(v.shape) for k, v in expected.items()}
    if "fc.weight" in want:
        want["fc.weight"][:1] = classes or want["fc.weight"][:1]
        want["fc.bias"] = classes or want["fc.bias"]
    mismatched = [k for k in expected if k in state_dict and shape(k) != want[k]]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if mismatched:
        k = mismatched[0]
        # N: any number of classes
        expect = ", ".join(map(str, ["N", *want[k][1:]] if k.startswith("fc.") else want[k]))
        parts.append(f"{len(mismatched)} shape mismatches (e.g. {k}: checkpoint "
                     f"{shape(k)}, {model_name} [{expect}])")
    msg = f"the checkpoint {source} does not fit {model_name}: " + "; ".join(parts or ["?"])
    guess = guess_architecture(state_dict)
    if guess is not None and guess != model_name:
        msg += f". It looks like a {guess} checkpoint: pass --model {guess}"
    return msg


def in_cli_words(text: str) -> str:
    """A message of the Python API (``pass weights= ...``, from ``fastres.models``) as the
    command line says it (``pass --weights ...``)."""
    return text.replace("pass weights= ", "pass --weights ")


def load_checkpoint(weights, arch: str | None = None) -> dict:
    """``fastres.models.load_weights`` with errors as one-line :class:`UserError` (``arch``
    names the model, for the hint on torchvision weight names such as ``IMAGENET1K_V2``).

    Training checkpoints load too (see ``load_weights``: optimizer state beside the model's,
    ``module.`` / ``_orig_mod.`` key prefixes, torchvision's reference-script checkpoints).
    """
    from fastres import models

    try:
        return models.load_weights(weights, arch)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        text = str(exc).removeprefix("fastres: ").strip()
        if "Weights only load failed" in text:  # torch's long weights_only explanation
            if "Unsupported global" in text:  # classes pickled in: a whole model, ...
                why = ("not a state_dict of tensors; a whole pickled model, torch.save(model), "
                       "is not loaded: save model.state_dict() instead")
            else:  # not a pickle at all (an image, random bytes)
                why = "it is not a PyTorch checkpoint (no pickled state_dict in it)"
            text = (text.split(":", 1)[0] + f": torch.load(weights_only=True) refused it "
                    f"({why})")
        lines = text.splitlines()
        raise UserError(lines[0] if lines else type(exc).__name__) from exc


def build_model(model_name: str, weights, device: torch.device, dtype: torch.dtype):
    """A fastres model with ``weights`` loaded, on ``device`` in ``dtype``, eval mode."""
    from fastres import models

    if model_name not in models.MODEL_NAMES:
        raise UserError(f"unknown model {model_name!r}; expected one of "
                        f"{', '.join(models.MODEL_NAMES)}")
    sd = load_checkpoint(weights, model_name)
    try:
        model = models.get_model(model_name, weights=sd)
    except (ValueError, RuntimeError) as exc:
        source = repr(os.fspath(weights)) if isinstance(weights, (str, os.PathLike)) else ""
        raise UserError(describe_mismatch(model_name, sd, source)) from exc
    return model.to(device=device, dtype=dtype).eval()


def classify(paths: Sequence[str], weights, model_name: str = "resnet50", topk: int = 5,
             device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             batch_size: int = 32) -> list[Prediction]:
    """Top-``topk`` ImageNet classes (softmax probabilities) for each image file.

    All images are read before the model is built, so a bad file fails fast. A ``topk``
    above the model's class count lists every class.
    """
    if topk < 1:
        raise UserError(f"--topk must be at least 1, got {topk}")
    device = torch.device(device)
    images = [load_image(p) for p in paths]
    model = build_model(model_name, weights, device, dtype)
    names = class_names(model.fc.out_features)
    k = min(topk, len(names))
    preds: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        batch, _ = imagenet_batch(images[start:start + batch_size], device, dtype)
        with torch.inference_mode():
            logits = model(batch)
        probs = torch.softmax(logits.float(), dim=1).cpu()
        bad = ~torch.isfinite(probs).all(dim=1)
        if bad.any():  # (a ranking of NaNs is no ranking)
            raise UserError(f"the model's output for {paths[start + int(bad.nonzero()[0])]!r} "
                            "is not finite (NaN or inf): are the weights finite?")
        values, indices = probs.topk(k, dim=1)
        for i, (vals, idxs) in enumerate(zip(values.tolist(), indices.tolist())):
            preds.append(Prediction(paths[start + i],
                                    [(j, names[j], v) for j, v in zip(idxs, vals)]))
    return preds


def format_predictions(preds: Sequence[Prediction]) -> str:
    lines = []
    for pred in preds:
        lines.append(f"{pred.path}:")
        for idx, name, prob in pred.topk:
            lines.append(f"  {prob:8.4f}  {name} ({idx})")
    return "\n".join(lines)
