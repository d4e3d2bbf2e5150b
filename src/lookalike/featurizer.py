"""Turn images into feature vectors: preprocessing, batching, and the model export.

On CPU the model is exported once from PyTorch to ONNX (cached on disk, keyed by model, weights
hash, input size and pooling) and run by the runtime ``runtimes`` picks (ONNX Runtime or
OpenVINO, fp32, bf16 or int8); on CUDA it runs in PyTorch, half precision, channels_last.
Each core decodes and preprocesses its own chunk of images and runs the model on it (Pillow and
the runtimes release the GIL), so decoding and inference overlap without any core waiting.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from . import runtimes
from .errors import ImageError, ModelError
from .images import DEFAULT_POLICY, ImagePolicy, ImageSource, load_image
from .models import Weights, create_torch_model
from .runtimes import cache_dir, cpu_count
from .types import ModelSpec

__all__ = ["Featurizer", "FeaturizeResult", "GRID", "GRID_SCALE", "REGIONS", "REGION_SCALE", "TURNS", "cache_dir",
           "cpu_count", "export_module", "export_onnx", "grid_boxes", "load_pixels", "region_boxes",
           "make_int8_model", "onnx_model", "onnx_path", "preprocess"]

EXPORT_VERSION = 3  # bump when the export settings change, so cached files are remade

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


TURNS = (0, 90, 180, 270)  # clockwise degrees tried for a query photo taken with the camera on its side
# Regions of a query photo (``region_boxes``): the whole picture, then squares of this share of its
# short side at the four corners and the centre. Chosen on benchmarks/camera.py's camera-sim
# photos (a one-off scan): 0.5 / 0.6 / 0.7 gave recall@1 0.770 / 0.777 / 0.728 (the whole picture
# alone: 0.445). Regions run without the flip averaging: on those photos and grocery-iconic's it
# moved recall@1 with verification by 0.002 at most (without, by 0.008), and it would double their
# cost. A further 3 x 3 grid of 0.4 squares raised camera-sim to 0.925 (from 0.902, with
# verification) but cost a camera query 2.5x the model time, past the live camera's budget; so the
# grid (``grid_boxes``) is a second look, taken only when the first is unsure (``regions="auto"``).
REGION_SCALE = 0.6
REGIONS = 6
GRID_SCALE = 0.4  # the second look: a GRID x GRID grid of squares of this share of the short side
GRID = 3

LOOK_AVERAGE = 0.2  # weight of the newest time in the moving averages a query's time budget is weighed by
CPU_CHUNK = 4  # inputs per model call on CPU: small batches stay in the core's cache (measured 1-8 best)


def moving_average(average: float | None, new: float) -> float:
    """``average`` with ``new`` folded in at weight LOOK_AVERAGE (``new`` itself when there is none yet)."""
    return new if not average else (1 - LOOK_AVERAGE) * average + LOOK_AVERAGE * new


def preprocess(img: Image.Image, spec: ModelSpec, out: np.ndarray | None = None) -> np.ndarray:
    """An RGB image as the model's float32 CHW input: resize short side, centre crop, normalise."""
    return normalize(crop(img, spec), spec, out)


def crop(img: Image.Image, spec: ModelSpec) -> np.ndarray:
    """An RGB image resized (short side) and centre-cropped to the model's input: uint8 [H, W, 3]."""
    size, scale = spec.input_size, spec.resize_size
    w, h = img.size
    if w <= h:
        new_w, new_h = scale, max(scale, round(h * scale / w))
    else:
        new_w, new_h = max(scale, round(w * scale / h)), scale
    resample = _INTERPOLATION.get(spec.interpolation, Image.Resampling.BICUBIC)
    # Resize only the centre crop: the same pixels as resize-then-crop, without making the border.
    left, top = (new_w - size) // 2, (new_h - size) // 2
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return np.asarray(img.resize((size, size), resample, box=box, reducing_gap=None))


def normalize(pixels: np.ndarray, spec: ModelSpec, out: np.ndarray | None = None) -> np.ndarray:
    """``crop``'s uint8 [H, W, 3] as the model's float32 [3, H, W] input (written into ``out`` if given)."""
    size = spec.input_size
    # (x / 255 - mean) / std as one multiply-add, written straight into a CHW float32 array.
    std = np.asarray(spec.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std))[:, None, None]
    offset = (-np.asarray(spec.mean, dtype=np.float32) / std)[:, None, None]
    out = np.empty((3, size, size), np.float32) if out is None else out
    np.multiply(pixels.transpose(2, 0, 1), scale, out=out)
    out += offset
    return out


def load_pixels(source: ImageSource, spec: ModelSpec, policy: ImagePolicy = DEFAULT_POLICY,
                out: np.ndarray | None = None) -> np.ndarray:
    """Decode one input (reduced-size JPEG decoding where the model's size allows) and preprocess it
    (into ``out`` if given)."""
    return preprocess(load_image(source, policy=policy, draft_size=spec.resize_size), spec, out)


def make_int8_model(spec: ModelSpec, weights: Weights, sources: Sequence[ImageSource], path: Path,
                    policy: ImagePolicy = DEFAULT_POLICY) -> int:
    """Quantize the spec's model to int8 at ``path``, calibrated on ``sources`` (unreadable ones
    are skipped); returns how many images calibrated it."""
    pixels = []
    for source in sources:
        try:
            pixels.append(load_pixels(source, spec, policy))
        except ImageError:
            continue
    stacked = np.stack(pixels) if pixels else np.zeros((0, 3, spec.input_size, spec.input_size), np.float32)
    runtimes.quantize_int8(onnx_model(spec, weights), stacked, path)
    return len(pixels)


class FeaturizeResult:
    """Vectors of the images that could be read, and the errors of those that could not."""

    def __init__(self, vectors: np.ndarray, ok: list[int], errors: list[tuple[int, ImageError]]):
        self.vectors = vectors  # float32 [len(ok), dim]
        self.ok = ok  # indices into the input of the rows of `vectors`
        self.errors = errors  # (input index, error) for inputs that were skipped


class Featurizer:
    """Featurize images with one model: ``featurize(images) -> FeaturizeResult``."""

    def __init__(
        self,
        spec: ModelSpec,
        weights: Weights,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        threads: int | None = None,
        policy: ImagePolicy = DEFAULT_POLICY,
        runtime: str = "auto",
        precision: str = "fp32",
        model_file: str | os.PathLike | None = None,
    ):
        """``runtime``: one of ``runtimes.RUNTIMES`` (``auto``: the fastest here, by measurement).
        ``precision``: fp32, bf16 or int8, or ``auto``: the fastest of ``runtimes.AUTO_PRECISIONS``
        here (``.precision`` says which); int8 runs ``model_file``, a model written by
        ``runtimes.quantize_int8`` (the others run the cached export of the spec's model)."""
        if device not in ("cpu", "cuda"):
            raise ModelError(f"unknown device {device!r}; use cpu or cuda", subject=device)
        if batch_size < 1:
            raise ModelError(f"batch size must be at least 1, got {batch_size}", subject=batch_size)
        self.spec = spec
        self.weights = weights
        self.device = device
        self.batch_size = batch_size
        self.threads = threads or cpu_count()
        self.policy = policy
        self.model_file = model_file  # the int8 model it runs (None: the cached export of the spec's)
        self._lock = threading.Lock()
        self._mirror: ThreadPoolExecutor | None = None  # runs the mirror image of a lone query
        self._input_ms = 0.0  # moving average of a model input's time in a lone call (``expected_ms``)
        self._timed_sizes: set[int] = set()  # batch sizes of lone calls met (the first of each is not timed)
        self._runtime = self._open_runtime(runtime, precision, model_file)
        self.dim = self._runtime.dim

    def _open_runtime(self, runtime: str, precision: str, model_file):
        make_model = lambda: create_torch_model(self.spec, self.weights)  # noqa: E731
        if self.device == "cuda":
            if runtime not in ("auto", "torch") or precision != "fp32":
                raise ModelError(f"device cuda runs PyTorch in fp16; runtime {runtime} and precision {precision} "
                                 "are for the CPU", subject=runtime)
            return runtimes.TorchCudaRuntime(make_model)
        runtimes.check_choice(runtime, precision)
        if precision == "int8":
            if model_file is None or not Path(model_file).is_file():
                raise ModelError(f"precision int8 needs its quantized model file, and {model_file} is not one",
                                 subject=str(model_file))
            path = Path(model_file)
            return self._load(runtime, path, precision, make_model)
        path = onnx_model(self.spec, self.weights)
        try:
            return self._load(runtime, path, precision, make_model)
        except ModelError:  # a damaged cache file: export again once
            path.unlink(missing_ok=True)
            return self._load(runtime, onnx_model(self.spec, self.weights), precision, make_model)

    def _load(self, runtime: str, path: Path, precision: str, make_model):
        if runtime == "auto" or precision == "auto":
            key = onnx_path(self.spec, self.weights).name
            return runtimes.choose(path, precision, self.threads, self.spec.input_size, make_model, model_key=key,
                                   only=None if runtime == "auto" else runtime)
        return runtimes.load(runtime, path, precision, self.threads, make_model)

    @property
    def runtime(self) -> str:
        return self._runtime.name

    @property
    def precision(self) -> str:
        return self._runtime.precision

    def load(self, source: ImageSource, out: np.ndarray | None = None) -> np.ndarray:
        """Decode and preprocess one input (into ``out`` if given; raises ImageError)."""
        return load_pixels(source, self.spec, self.policy, out)

    def run(self, pixels: np.ndarray, *, alone: bool = False, flip: bool = True) -> np.ndarray:
        """Run the model on a preprocessed batch [n, 3, H, W] -> float32 [n, dim].

        With ``tta`` = ``flip`` (and ``flip``) the vector is the mean of the image's and its mirror
        image's vectors: one batch of 2n, or, when the call is ``alone`` on the CPU (a single query,
        the other cores idle), the two halves at once on two cores.
        """
        n = len(pixels)
        flip = flip and self.spec.tta == "flip" and n > 0
        start = time.perf_counter()
        if self.device != "cpu":
            with self._lock:
                out = self._runtime.run(np.concatenate([pixels, pixels[..., ::-1]]) if flip else pixels)
        elif flip and alone and self.threads > 1:
            mirror = self._mirror_pool().submit(self._runtime.run, np.ascontiguousarray(pixels[..., ::-1]))
            out = np.concatenate([self._runtime.run(pixels), mirror.result()])
        else:  # the CPU runtimes may be called from several threads at once
            out = self._runtime.run(np.concatenate([pixels, pixels[..., ::-1]]) if flip else pixels, alone=alone)
        if alone and n:
            self._time_inputs(2 * n if flip else n, time.perf_counter() - start)
        if flip:
            out = (out[:n] + out[n:]) * np.float32(0.5)
        return out

    def _time_inputs(self, inputs: int, seconds: float) -> None:
        """Fold a lone call's time into ``expected_ms``'s average; a batch size's first call
        (an OpenVINO model compiled for it, memory allocated) is left out."""
        if inputs not in self._timed_sizes:
            self._timed_sizes.add(inputs)
            return
        self._input_ms = moving_average(self._input_ms, 1000.0 * seconds / inputs)

    def expected_ms(self, inputs: int) -> float:
        """How long ``inputs`` model inputs take in one lone call (a query's), in ms, from the
        lone calls made so far (a moving average of their time per input; 0.0 before any): what
        a query's time budget weighs a second look by."""
        return inputs * self._input_ms

    def _mirror_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._mirror is None:
                self._mirror = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lookalike-mirror")
            return self._mirror

    def featurize(
        self,
        sources: Sequence[ImageSource],
        *,
        strict: bool = False,
        progress: Callable[[int], None] | None = None,
    ) -> FeaturizeResult:
        """Featurize ``sources`` in batches; unreadable inputs are skipped (raised if ``strict``).

        ``progress(n)`` is called after each batch with the number of inputs it consumed.
        """
        vectors: list[np.ndarray] = []
        ok: list[int] = []
        errors: list[tuple[int, ImageError]] = []
        for indices, batch_vectors, batch_errors in self._featurized(sources):
            if batch_errors and strict:
                raise batch_errors[0][1]
            errors.extend(batch_errors)
            if len(indices):
                vectors.append(batch_vectors)
                ok.extend(indices)
            if progress:
                progress(len(indices) + len(batch_errors))
        out = np.concatenate(vectors) if vectors else np.zeros((0, self.dim), np.float32)
        return FeaturizeResult(out, ok, errors)

    def featurize_turned(self, sources: Sequence[ImageSource]) -> np.ndarray:
        """Each input upright and turned by 90, 180 and 270 degrees: float32 [n, 4, dim].

        Decoded once: the model's input is square, so turning it is turning the picture.
        Unreadable inputs raise ImageError (this is the query path).
        """
        out = np.zeros((len(sources), len(TURNS), self.dim), np.float32)
        for i, source in enumerate(sources):
            pixels = self.load(source)
            turned = np.stack([np.rot90(pixels, k=-t // 90, axes=(1, 2)) for t in TURNS])
            out[i] = self.run(np.ascontiguousarray(turned), alone=True)
        return out

    def draft_size(self, regions: bool | str = False) -> int:
        """The smallest short side a query must be decoded at: the model's resize, or with
        ``regions`` enough for the smallest region (REGION_SCALE of the short side; with "auto",
        GRID_SCALE: the grid of the second look) to have it."""
        if not regions:
            return self.spec.resize_size
        return math.ceil(self.spec.resize_size / (GRID_SCALE if regions == "auto" else REGION_SCALE))

    def featurize_regions(self, sources: Sequence[ImageSource], turns: Sequence[int] | None = None,
                          grid: bool = False) -> np.ndarray:
        """Each input's regions (``region_boxes``: the whole picture first): float32 [n, REGIONS, dim];
        with ``grid``, the squares of ``grid_boxes`` instead: [n, GRID ** 2, dim].

        ``turns``: clockwise degrees (of TURNS) to turn each picture first (``orient``). Decoded
        once, at the size the smallest region needs; no flip averaging (see REGIONS). Unreadable
        inputs raise ImageError (the query path).
        """
        boxes = grid_boxes if grid else region_boxes
        out = np.zeros((len(sources), GRID**2 if grid else REGIONS, self.dim), np.float32)
        for i, source in enumerate(sources):
            img = load_image(source, policy=self.policy, draft_size=self.draft_size(regions="auto" if grid else True))
            turn = turns[i] if turns is not None else 0
            if turn:
                img = img.transpose(_TRANSPOSE[turn])
            pixels = np.stack([preprocess(img.crop(box), self.spec) for box in boxes(*img.size)])
            out[i] = self.run(pixels, alone=True, flip=False)
        return out

    def _featurized(self, sources: Sequence[ImageSource]) -> Iterator[tuple[list[int], np.ndarray, list]]:
        """Yield (indices, vectors, errors) in input order."""
        if self.device == "cpu":
            yield from self._chunks(sources)
        else:
            for indices, pixels, errs in self._batches(sources):
                yield indices, self.run(pixels), errs

    def _chunks(self, sources: Sequence[ImageSource]) -> Iterator[tuple[list[int], np.ndarray, list]]:
        """CPU: yield (indices, vectors, errors) per chunk of CPU_CHUNK inputs, in order.

        Each worker decodes its chunk and runs the model on it, one core per call, so the cores
        never wait for each other: no barrier between the model's threads after every layer. There
        are as many workers as the runtime says keep its cores busy (``workers``: one per core, and
        with OpenVINO, whose requests queue for its own per-core streams, one more, decoding while
        the others' requests run).
        """

        def work(start: int):
            size = self.spec.input_size
            pixels = np.empty((CPU_CHUNK, 3, size, size), np.float32)  # written in place: no stacking copy
            indices, errs = [], []
            for i in range(start, min(start + CPU_CHUNK, len(sources))):
                try:
                    self.load(sources[i], out=pixels[len(indices)])
                    indices.append(i)
                except ImageError as exc:
                    errs.append((i, exc))
            if not indices:
                return indices, np.zeros((0, self.dim), np.float32), errs
            pixels = pixels[:len(indices)]
            return indices, self.run(pixels, alone=len(sources) == 1), errs

        if len(sources) <= CPU_CHUNK and (len(sources) == 1 or self.threads == 1):
            yield work(0)  # a lone query: in the caller's thread, no pool to start and hand over to
            return
        starts = iter(range(0, len(sources), CPU_CHUNK))
        with ThreadPoolExecutor(max_workers=self._runtime.workers, thread_name_prefix="lookalike-featurize") as pool:
            pending = deque(pool.submit(work, s) for s in islice(starts, 4 * self.threads))  # bounded look-ahead
            try:
                while pending:
                    done = pending.popleft().result()
                    pending.extend(pool.submit(work, s) for s in islice(starts, 1))
                    yield done
            finally:
                for future in pending:
                    future.cancel()

    def _batches(self, sources: Sequence[ImageSource]) -> Iterator[tuple[list[int], np.ndarray, list]]:
        """Yield (indices, pixels, errors) per batch; decoding of the next batches runs ahead."""

        def load(i: int):
            try:
                return i, self.load(sources[i]), None
            except ImageError as exc:
                return i, None, exc

        n = len(sources)
        starts = list(range(0, n, self.batch_size))
        workers = max(1, self.threads)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lookalike-decode") as pool:
            pending = [pool.map(load, range(s, min(s + self.batch_size, n))) for s in starts[:2]]
            for b, _ in enumerate(starts):
                done = list(pending.pop(0))
                if b + 2 < len(starts):
                    s = starts[b + 2]
                    pending.append(pool.map(load, range(s, min(s + self.batch_size, n))))
                indices = [i for i, arr, err in done if err is None]
                errs = [(i, err) for i, arr, err in done if err is not None]
                pixels = (
                    np.stack([arr for _, arr, err in done if err is None])
                    if indices
                    else np.zeros((0, 3, self.spec.input_size, self.spec.input_size), np.float32)
                )
                yield indices, pixels, errs


_TRANSPOSE = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}  # clockwise


def region_boxes(width: int, height: int, scale: float = REGION_SCALE) -> list[tuple[int, int, int, int]]:
    """The REGIONS boxes (left, top, right, bottom) of a query picture: the whole of it, then
    squares of ``scale`` x its short side at the four corners and in the centre, where an item
    held up to a camera tends to be when it does not fill the frame."""
    side = max(1, round(scale * min(width, height)))
    x, y = width - side, height - side
    corners = [(0, 0), (x, 0), (0, y), (x, y), (x // 2, y // 2)]
    return [(0, 0, width, height)] + [(left, top, left + side, top + side) for left, top in corners]


def grid_boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The GRID x GRID squares (left, top, right, bottom) of GRID_SCALE x a picture's short side,
    spread evenly from edge to edge (overlapping): the second look for an item too small for the
    REGIONS, row by row from the top left."""
    side = max(1, round(GRID_SCALE * min(width, height)))
    xs = np.linspace(0, width - side, GRID).round().astype(int).tolist()
    ys = np.linspace(0, height - side, GRID).round().astype(int).tolist()
    return [(x, y, x + side, y + side) for y in ys for x in xs]


def onnx_model(spec: ModelSpec, weights: Weights) -> Path:
    """The spec's model as an ONNX file in the user cache, exported now if it is not there yet."""
    path = onnx_path(spec, weights)
    if not path.is_file():
        export_onnx(spec, weights, path)
    return path


def onnx_path(spec: ModelSpec, weights: Weights) -> Path:
    """Where the exported model is cached: keyed by model, weights hash, input size, pooling, export version."""
    name = f"ft-{Path(spec.name).name}" if spec.weights_file else spec.name  # a model directory: by its name
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    pooling = "" if spec.pooling == "avg" else f"-{spec.pooling}"
    key = f"{safe}-{weights.sha256[:16]}-{spec.input_size}px{pooling}-v{EXPORT_VERSION}.onnx"
    return cache_dir() / "onnx" / key


def export_onnx(spec: ModelSpec, weights: Weights, path: Path) -> None:
    """Export the spec's feature model to ONNX at ``path``, atomically (temp file + rename)."""
    export_module(create_torch_model(spec, weights), spec.input_size, path, spec.name)


def export_module(model, size: int, path: Path, name: str) -> None:
    """Export a torch module of input float32 [n, 3, size, size] (``pixels``, output ``features``)
    to ONNX at ``path``, atomically; ModelError naming ``name`` if it fails."""
    import torch

    model = _static_same_padding(model, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, size, size)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, example, tmp, dynamo=False, opset_version=17,
                input_names=["pixels"], output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
            )
        _fold_pads(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as exc:
        raise ModelError(f"{name}: export to ONNX failed ({type(exc).__name__}: {exc})", subject=name) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _static_same_padding(model, size: int):
    """Give timm's Conv2dSame layers the fixed padding of a ``size`` input.

    Conv2dSame computes TF "SAME" padding from the input shape at run time; exported, that is a
    chain of shape arithmetic and a Pad before 5 of the convolutions, which also forces ONNX
    Runtime to convert the tensor layout back and forth around each Pad. The input size is fixed,
    so the padding is a constant that ``_fold_pads`` can move into the Conv itself.
    """
    import torch
    import torch.nn.functional as F
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.padding import get_same_padding

    layers = {name: m for name, m in model.named_modules() if isinstance(m, Conv2dSame)}
    shapes: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: shapes.__setitem__(n, tuple(a[0].shape[-2:])))
             for n, m in layers.items()]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    for name, m in layers.items():
        ih, iw = shapes[name]
        ph = get_same_padding(ih, m.kernel_size[0], m.stride[0], m.dilation[0])
        pw = get_same_padding(iw, m.kernel_size[1], m.stride[1], m.dilation[1])
        pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        m.forward = lambda x, m=m, pads=pads: F.conv2d(F.pad(x, pads), m.weight, m.bias, m.stride, (0, 0), m.dilation, m.groups)
    return model


def _fold_pads(path: str) -> None:
    """Rewrite the ONNX file at ``path``: constants folded, each zero Pad merged into its Conv's pads,
    constants no node uses dropped."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # portable rewrites only
    options.optimized_model_filepath = path + ".basic"
    options.log_severity_level = 3
    try:
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        model = onnx.load(path + ".basic")
    finally:
        if os.path.exists(path + ".basic"):
            os.unlink(path + ".basic")
    graph = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        pads = consts.get(pad.input[1]) if len(pad.input) > 1 else None
        value = consts.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        after = users.get(pad.output[0], [])
        if (mode != b"constant" or pads is None or value is None or np.any(value != 0) or len(pads) != 8
                or np.any(pads[[0, 1, 4, 5]] != 0) or len(after) != 1 or after[0].op_type != "Conv"):
            continue
        conv = after[0]
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0, 0, 0, 0])
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for a in conv.attribute):
            continue
        new = [old[0] + int(pads[2]), old[1] + int(pads[3]), old[2] + int(pads[6]), old[3] + int(pads[7])]
        for a in [a for a in conv.attribute if a.name == "pads"]:
            conv.attribute.remove(a)
        conv.attribute.append(helper.make_attribute("pads", new))
        conv.input[0] = pad.input[0]
        graph.node.remove(pad)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:  # left by folding: runtimes warn of them
        graph.initializer.remove(init)
    onnx.save(model, path)
