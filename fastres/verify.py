"""Side-by-side correctness of fastres against eager torchvision (``fastres verify``).

The contract (DESIGN.md): relative error ``||out - ref|| / ||ref||`` per output tensor,
against a precise reference -- float64 on the CPU, fp32 with TF32 off on a GPU -- within
fp32 1e-5 (TF32 off) / 2e-3 (TF32 on), fp16/bf16 2e-2. Deep networks with random weights can
exceed those bounds even when eager PyTorch computes them in the same dtype (rounding grows
over 50-150 layers), so the bound used is ``max(DESIGN bound, 2 x eager's own error in the same
dtype on the same input)`` -- the test suite's rule (STYLE.md: tolerance relative to eager).

These helpers are shared with :mod:`fastres.bench`, which checks outputs the same way before
it times anything.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from fastres.classify import UserError, dtype_name, imagenet_batch
from fastres.ops import _backend
from fastres.ops._backend import tf32_off

# -- models --------------------------------------------------------------------------------------


def require_torchvision():
    try:
        import torchvision
    except ImportError as exc:
        raise UserError("this command compares against torchvision, which is not installed "
                        "(pip install torchvision)") from exc
    return torchvision


def realistic_bn(model: nn.Module, steps: int = 3, size: int = 64, batch: int = 2,
                 device: torch.device | str = "cpu") -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters; ``eval()``.

    A few train-mode passes on random data move the running statistics off the identity, and
    the BN affine parameters and the ``fc`` bias are randomized (a fresh init's gamma=1, beta=0
    would hide a wrong fold of either).
    """
    model.train()
    with torch.no_grad():
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0.0, 0.2)
            m.momentum = 0.5
        for _ in range(steps):
            model(torch.randn(batch, 3, size, size, device=device) * 2 + 0.5)
        for m in bns:
            m.momentum = 0.1
        if getattr(model, "fc", None) is not None and model.fc.bias is not None:
            model.fc.bias.normal_(0.0, 0.1)
    return model.eval()


def torchvision_model(name: str, weights=None, device: torch.device | str = "cpu",
                      bn_steps: int = 3) -> nn.Module:
    """torchvision's ``name`` in fp32 eval mode on ``device``.

    With ``weights`` (a checkpoint path or state_dict) they are loaded strictly; without,
    the model gets realistic BatchNorm statistics (:func:`realistic_bn`).
    """
    from fastres import models

    tv = require_torchvision()
    if name not in models.MODEL_NAMES:
        raise UserError(f"unknown model {name!r}; expected one of {', '.join(models.MODEL_NAMES)}")
    if weights is None:
        model = getattr(tv.models, name)(weights=None).to(device)
        return realistic_bn(model, steps=bn_steps, device=device)
    from fastres.classify import describe_mismatch, load_checkpoint

    sd = load_checkpoint(weights, name)
    num_classes = sd["fc.weight"].shape[0] if "fc.weight" in sd else 1000
    model = getattr(tv.models, name)(weights=None, num_classes=num_classes)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        source = repr(os.fspath(weights)) if isinstance(weights, (str, os.PathLike)) else ""
        raise UserError(describe_mismatch(name, sd, source)) from exc
    return model.to(device).eval()


def fastres_twin(tv_model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A fastres model with ``tv_model``'s weights, cast to ``dtype``, eval mode."""
    import fastres

    return fastres.from_torchvision(tv_model).to(dtype).eval()


# -- numerics ------------------------------------------------------------------------------------


def rel_err(out: Tensor, ref: Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; ``inf`` when ``out`` has a NaN/inf ``ref`` lacks."""
    out64, ref64 = out.detach().double(), ref.detach().to(out.device).double()
    if out64.shape != ref64.shape:
        raise ValueError(f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all() and torch.isfinite(ref64).all():
        return math.inf
    num = torch.linalg.vector_norm((out64 - ref64).flatten())
    den = torch.linalg.vector_norm(ref64.flatten()).clamp_min(1e-30)
    return float(num / den)


def rel_err_rows(out: Tensor, ref: Tensor) -> Tensor:
    """Per-sample relative error of ``[N, C]`` logits (float64, on the CPU)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    num = torch.linalg.vector_norm(out64 - ref64, dim=1)
    den = torch.linalg.vector_norm(ref64, dim=1).clamp_min(1e-30)
    err = num / den
    err[~torch.isfinite(out64).all(dim=1)] = math.inf
    return err


def topk_agreement(out: Tensor, ref: Tensor, k: int) -> float:
    """Fraction of samples whose top-``k`` class *sets* agree (k=1: same argmax)."""
    k = min(k, ref.shape[1])
    a = out.detach().float().topk(k, dim=1).indices.sort(dim=1).values
    b = ref.detach().float().topk(k, dim=1).indices.sort(dim=1).values
    return float((a == b).all(dim=1).float().mean()) if ref.shape[0] else 1.0


def design_tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """DESIGN.md's end-to-end bound for ``dtype`` on ``device`` (TF32 as cuDNN is set)."""
    if dtype == torch.float32:
        tf32 = device.type == "cuda" and _backend.cudnn_allow_tf32()
        return 2e-3 if tf32 else 1e-5
    return 2e-2


def reference_forward(tv_model: nn.Module, x: Tensor, ref64: nn.Module | None = None) -> Tensor:
    """The precise reference output: float64 on the CPU, fp32 TF32-off on a GPU.

    ``ref64`` is an optional float64 copy of ``tv_model`` (made here when not given).
    """
    with torch.inference_mode():
        if x.device.type == "cpu":
            model = ref64 if ref64 is not None else copy.deepcopy(tv_model).double()
            return model(x.double())
        with tf32_off():
            return tv_model(x.float())


def eager_forward(tv_model: nn.Module, x: Tensor, dtype: torch.dtype,
                  cast_model: nn.Module | None = None) -> Tensor:
    """torchvision eager in ``dtype`` (the model cast to it, channels-last input)."""
    model = cast_model
    if model is None:
        model = tv_model if dtype == torch.float32 else copy.deepcopy(tv_model).to(dtype)
    with torch.inference_mode():
        return model(x.to(dtype).contiguous(memory_format=torch.channels_last))


# -- verify ----------------------------------------------------------------------------------


@dataclass
class Agreement:
    """fastres vs the reference (and eager in the same dtype) over a set of batches."""

    name: str
    images: int = 0
    batch_errors: list[float] = field(default_factory=list)
    eager_errors: list[float] = field(default_factory=list)
    tolerances: list[float] = field(default_factory=list)
    max_image_error: float = 0.0
    top1: float = 0.0
    top5: float = 0.0
    eager_top1: float = 0.0
    _top1_hits: float = 0.0
    _top5_hits: float = 0.0
    _eager_top1_hits: float = 0.0
    note: str = ""
    # fastres ran torchvision's eager code instead of its fused path (why): eager compared
    # with itself proves nothing about the fused path, so the part fails
    eager_fallback: str = ""
    # batches whose reference output had a NaN or inf: nothing to compare against (a failure)
    reference_not_finite: int = 0

    def add(self, out: Tensor, ref: Tensor, eager: Tensor, tol_design: float) -> None:
        n = ref.shape[0]
        if not bool(torch.isfinite(ref).all()):
            self.reference_not_finite += 1
            self.note = ("torchvision's own output is not finite (NaN or inf): are the weights "
                         "finite?")
        shaped = isinstance(out, Tensor) and tuple(out.shape) == tuple(ref.shape)
        if not shaped:  # a wrong-shaped output is a failed batch (reported), not a crash
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            self.note = f"fastres returned {shape}, torchvision {tuple(ref.shape)}"
        err = rel_err(out, ref) if shaped else math.inf
        eager_err = rel_err(eager, ref)
        self.batch_errors.append(err)
        self.eager_errors.append(eager_err)
        tol = max(tol_design, 2 * eager_err) if math.isfinite(eager_err) else tol_design
        self.tolerances.append(tol)
        image_err = float(rel_err_rows(out, ref).max()) if shaped else math.inf
        self.max_image_error = max(self.max_image_error, image_err)
        if shaped:
            self._top1_hits += topk_agreement(out, ref, 1) * n
            self._top5_hits += topk_agreement(out, ref, 5) * n
        self._eager_top1_hits += topk_agreement(eager, ref, 1) * n
        self.images += n
        self.top1 = self._top1_hits / self.images
        self.top5 = self._top5_hits / self.images
        self.eager_top1 = self._eager_top1_hits / self.images

    @property
    def max_error(self) -> float:
        return max(self.batch_errors, default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(self.batch_errors) / len(self.batch_errors) if self.batch_errors else 0.0

    @property
    def failures(self) -> int:
        return sum(1 for e, t in zip(self.batch_errors, self.tolerances) if not e <= t)

    @property
    def ok(self) -> bool:
        return self.failures == 0 and not self.eager_fallback and not self.reference_not_finite

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d.update(max_error=self.max_error, mean_error=self.mean_error,
                 failures=self.failures, ok=self.ok)
        return d


@dataclass
class VerifyResult:
    model: str
    dtype: str
    device: str
    batch_size: int
    image_size: int
    design_tolerance: float
    parts: list[Agreement]
    notes: list[str]

    @property
    def compared(self) -> int:
        """Images compared over all parts (0: nothing was checked, which is no pass)."""
        return sum(p.images for p in self.parts)

    @property
    def ok(self) -> bool:
        return self.compared > 0 and all(p.ok for p in self.parts)

    def format(self) -> str:
        reference = "float64" if self.device == "cpu" else "fp32 with TF32 off"
        lines = [
            (f"fastres verify: {self.model}, {self.dtype}, batch {self.batch_size}, "
             f"{self.image_size}x{self.image_size}, on {self.device}"),
            (f"  reference: torchvision eager, {reference}; bound per batch: "
             f"max({self.design_tolerance:.3g} (base), 2 x eager {self.dtype}'s own error)"),
        ]
        head = (f"  {'inputs':<16}{'images':>7}{'max rel err':>13}{'mean rel err':>14}"
                f"{'eager max':>11}{'max/image':>11}{'top-1':>8}{'top-5':>8}  result")
        lines.append(head)
        for p in self.parts:
            if p.images == 0:
                lines.append(f"  {p.name:<16}{'-':>7}  skipped: {p.note}")
                continue
            result = "ok" if p.ok else f"FAILED ({p.failures}/{len(p.batch_errors)} batches)"
            if p.eager_fallback:
                result = (f"FAILED: fastres ran torchvision's eager code ({p.eager_fallback}), "
                          "not its fused path")
            if p.note:
                result += f": {p.note}"
            lines.append(
                f"  {p.name:<16}{p.images:>7}{p.max_error:>13.2e}{p.mean_error:>14.2e}"
                f"{max(p.eager_errors):>11.2e}{p.max_image_error:>11.2e}"
                f"{p.top1 * 100:>7.1f}%{p.top5 * 100:>7.1f}%  {result}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.ok:
            verdict = "PASSED"
        elif self.compared == 0:
            verdict = "FAILED (nothing was compared)"
        elif any(p.eager_fallback for p in self.parts):
            verdict = "FAILED (the fused path did not run)"
        elif any(p.reference_not_finite for p in self.parts):
            verdict = ("FAILED (torchvision's output is not finite: there was nothing to "
                       "compare against)")
        else:
            verdict = "FAILED (outputs disagree beyond the tolerance)"
        lines.append("verify: " + verdict)
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"model": self.model, "dtype": self.dtype, "device": self.device,
                "batch_size": self.batch_size, "image_size": self.image_size,
                "design_tolerance": self.design_tolerance, "ok": self.ok, "notes": self.notes,
                "parts": [p.summary() for p in self.parts]}


# Colour (or grey) photographs bundled in scikit-image's wheel: (loader name, file name).
SKIMAGE_PHOTOS = (
    ("astronaut", "astronaut.png"),
    ("coffee", "coffee.png"),
    ("chelsea", "chelsea.png"),
    ("rocket", "rocket.jpg"),
    ("hubble_deep_field", "hubble_deep_field.jpg"),
    ("immunohistochemistry", "ihc.png"),
    ("motorcycle_left", "motorcycle_left.png"),
    ("camera", "camera.png"),
    ("coins", "coins.png"),
    ("brick", "brick.png"),
)


def skimage_photos(limit: int | None = None) -> tuple[list[tuple[str, object]], str]:
    """``[(name, HxWxC uint8 array)]`` from scikit-image's bundled samples, and a note.

    Only files shipped in the wheel are used (nothing is downloaded); an empty list with a
    note when scikit-image is missing.
    """
    try:
        from skimage import data
    except ImportError:
        return [], "scikit-image is not installed: photographs skipped (pip install scikit-image)"
    data_dir = getattr(data, "data_dir", None)
    photos = []
    for name, fname in SKIMAGE_PHOTOS:
        if limit is not None and len(photos) >= limit:
            break
        loader = getattr(data, "stereo_motorcycle" if name == "motorcycle_left" else name, None)
        if loader is None or not data_dir or not os.path.isfile(os.path.join(data_dir, fname)):
            continue
        try:
            arr = loader()
            if name == "motorcycle_left":
                arr = arr[0]
        except Exception:  # a sample that would need a download, or a broken file: skip it
            continue
        photos.append((name, arr))
    if not photos:
        return [], "no bundled scikit-image photographs found: photographs skipped"
    return photos, ""


def out_of_memory(exc: BaseException) -> bool:
    """An allocation failure (CUDA's OutOfMemoryError, the CPU allocator's, Python's)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return "out of memory" in text or "can't allocate memory" in text


def short_error(exc: BaseException, limit: int = 160) -> str:
    """``exc`` as one line of at most ``limit`` characters: its type and first line."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


class EagerProbe:
    """Notices a fastres model running torchvision's eager code instead of its fused plan.

    fastres falls back to eager for inputs or models its plan does not take (BatchNorm that
    folds to non-finite weights in the dtype, hooks, ...) and warns once per process: timed,
    that row would show eager's speed under fastres's name. The fallback goes through the
    model's ``_forward_impl``, which this wraps for the duration of the check call.
    """

    def __init__(self, model: nn.Module | None):
        self.model = model if hasattr(type(model), "_forward_fused") else None
        self.ran = False

    def __enter__(self) -> EagerProbe:
        if self.model is not None:
            original = self.model._forward_impl

            def spy(x):
                self.ran = True
                return original(x)

            spy.fastres_probe = True  # (the plan runs: other instance overrides run eagerly)
            self.model.__dict__["_forward_impl"] = spy  # this instance only
        return self

    def __exit__(self, *exc) -> None:
        if self.model is not None:
            self.model.__dict__.pop("_forward_impl", None)

    def why(self, x: Tensor) -> str:
        """fastres's reason for running eagerly on ``x`` (best effort)."""
        from fastres import plan as _plan

        try:
            with torch.inference_mode():
                reason = _plan.eager_reason(self.model, x)
                if reason is None:
                    plan = _plan.get_plan(self.model, _plan.compute_dtype(self.model, x))
                    reason = plan.head_misfit or plan.misfit(*_plan._sizes(x)[1:])
        except Exception as exc:  # noqa: BLE001 - FloatingPointError: weights not finite
            return short_error(exc)
        return reason or "reason not known"


def _fastres_forward(fr: nn.Module, x: Tensor, part: Agreement) -> Tensor:
    """``fr(x)`` under inference mode, noting in ``part`` when fastres ran torchvision's eager
    code instead of its fused path (as ``fastres bench`` refuses to time it)."""
    with torch.inference_mode(), EagerProbe(fr) as probe:
        out = fr(x)
    if probe.ran and not part.eager_fallback:
        part.eager_fallback = probe.why(x)
    return out


def verify(model_name: str = "resnet50", dtype: torch.dtype = torch.float32,
           batch_size: int = 8, batches: int = 8, image_size: int = 224,
           device: torch.device | str = "cpu", weights=None, photos: bool = True,
           seed: int = 0, tolerance: float | None = None, progress: bool = False
           ) -> VerifyResult:
    """Run fastres and torchvision side by side on ``batches`` random batches and on photos.

    Random batches alternate NCHW-contiguous and channels-last inputs (both layouts must give
    torchvision's answer). Photographs go through torchvision's ImageNet recipe
    (:func:`fastres.classify.imagenet_batch`). ``tolerance`` overrides DESIGN.md's bound (the
    eager-relative rule still applies).
    """
    device = torch.device(device)
    if batch_size < 1 or batches < 0:
        raise UserError(f"--batch-size must be >= 1 and --batches >= 0, got {batch_size}, "
                        f"{batches}")
    torch.manual_seed(seed)
    tv = torchvision_model(model_name, weights, device)
    fr = fastres_twin(tv, dtype)
    eager_model = tv if dtype == torch.float32 else copy.deepcopy(tv).to(dtype)
    ref64 = copy.deepcopy(tv).double() if device.type == "cpu" else None
    tol = tolerance if tolerance is not None else design_tolerance(dtype, device)
    notes: list[str] = []

    rand = Agreement("random")
    it = range(batches)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="verify", leave=False)
    for i in it:
        x = torch.randn(batch_size, 3, image_size, image_size, device=device)
        if i % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        ref = reference_forward(tv, x, ref64)
        eager = eager_forward(tv, x, dtype, eager_model)
        out = _fastres_forward(fr, x.to(dtype), rand)
        rand.add(out, ref, eager, tol)
    parts = [rand]

    photo_part = Agreement("photos")
    if photos:
        imgs, note = skimage_photos()
        if note:
            photo_part.note = note
            notes.append(note)
        if imgs:
            x, _ = imagenet_batch([a for _, a in imgs], device, torch.float32)
            xd, how = imagenet_batch([a for _, a in imgs], device, dtype)
            path = "the fused fastres preprocess op" if how == "fused" else "plain torch"
            notes.append(f"photos ({', '.join(n for n, _ in imgs)}): torchvision's ImageNet "
                         f"recipe; fastres's input normalized by {path} in {dtype_name(dtype)}")
            ref = reference_forward(tv, x, ref64)
            eager = eager_forward(tv, x, dtype, eager_model)
            out = _fastres_forward(fr, xd, photo_part)
            photo_part.add(out, ref, eager, tol)
        parts.append(photo_part)
    else:
        photo_part.note = "--no-photos"
        parts.append(photo_part)
    return VerifyResult(model_name, dtype_name(dtype), str(device), batch_size, image_size, tol,
                        parts, notes)
