"""Turn images into feature vectors: preprocessing, batching, and the model runtime.

On CPU the model runs in ONNX Runtime (exported once from PyTorch and cached on disk, keyed by
model, weights hash and input size); on CUDA in PyTorch, half precision, channels_last.
Images are decoded and preprocessed in a thread pool while the model runs on the previous
batch (Pillow and ONNX Runtime release the GIL), so decoding overlaps inference.
"""

from __future__ import annotations

import os
import tempfile
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import ImageError, ModelError
from .images import DEFAULT_POLICY, ImagePolicy, ImageSource, load_image
from .models import Weights, create_torch_model
from .types import ModelSpec

EXPORT_VERSION = 2  # bump when the export settings change, so cached files are remade

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


TURNS = (0, 90, 180, 270)  # clockwise degrees tried for a query photo taken with the camera on its side

CPU_CHUNK = 4  # inputs per model call on CPU: small batches stay in the core's cache (measured 1-8 best)


def cache_dir() -> Path:
    """The user cache: ``$LOOKALIKE_CACHE``, else ``$XDG_CACHE_HOME/lookalike``, else ~/.cache/lookalike."""
    if os.environ.get("LOOKALIKE_CACHE"):
        return Path(os.environ["LOOKALIKE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lookalike"


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def preprocess(img: Image.Image, spec: ModelSpec) -> np.ndarray:
    """An RGB image as the model's float32 CHW input: resize short side, centre crop, normalise."""
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
    img = img.resize((size, size), resample, box=box, reducing_gap=None)
    # (x / 255 - mean) / std as one multiply-add, written straight into a CHW float32 array.
    std = np.asarray(spec.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std))[:, None, None]
    offset = (-np.asarray(spec.mean, dtype=np.float32) / std)[:, None, None]
    out = np.empty((3, size, size), np.float32)
    np.multiply(np.asarray(img).transpose(2, 0, 1), scale, out=out)
    out += offset
    return out


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
    ):
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
        self._lock = threading.Lock()
        self._mirror: ThreadPoolExecutor | None = None  # runs the mirror image of a lone query
        self._runtime = _TorchCudaRuntime(spec, weights) if device == "cuda" else _OnnxRuntime(spec, weights, self.threads)
        self.dim = self._runtime.dim

    @property
    def runtime(self) -> str:
        return self._runtime.name

    def load(self, source: ImageSource) -> np.ndarray:
        """Decode and preprocess one input (raises ImageError)."""
        img = load_image(source, policy=self.policy, draft_size=self.spec.resize_size)
        return preprocess(img, self.spec)

    def run(self, pixels: np.ndarray, *, alone: bool = False) -> np.ndarray:
        """Run the model on a preprocessed batch [n, 3, H, W] -> float32 [n, dim].

        With ``tta`` = ``flip`` the vector is the mean of the image's and its mirror image's
        vectors: one batch of 2n, or, when the call is ``alone`` on the CPU (a single query, the
        other cores idle), the two halves at once on two cores.
        """
        n = len(pixels)
        flip = self.spec.tta == "flip" and n > 0
        if self.device != "cpu":
            with self._lock:
                out = self._runtime.run(np.concatenate([pixels, pixels[..., ::-1]]) if flip else pixels)
        elif flip and alone and self.threads > 1:
            mirror = self._mirror_pool().submit(self._runtime.run, np.ascontiguousarray(pixels[..., ::-1]))
            out = np.concatenate([self._runtime.run(pixels), mirror.result()])
        else:  # an ONNX Runtime session may be run from several threads at once
            out = self._runtime.run(np.concatenate([pixels, pixels[..., ::-1]]) if flip else pixels)
        if flip:
            out = (out[:n] + out[n:]) * np.float32(0.5)
        return out

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

    def _featurized(self, sources: Sequence[ImageSource]) -> Iterator[tuple[list[int], np.ndarray, list]]:
        """Yield (indices, vectors, errors) in input order."""
        if self.device == "cpu":
            yield from self._chunks(sources)
        else:
            for indices, pixels, errs in self._batches(sources):
                yield indices, self.run(pixels), errs

    def _chunks(self, sources: Sequence[ImageSource]) -> Iterator[tuple[list[int], np.ndarray, list]]:
        """CPU: yield (indices, vectors, errors) per chunk of CPU_CHUNK inputs, in order.

        Each of ``threads`` workers decodes its chunk and runs the single-threaded ONNX session
        on it, so the cores never wait for each other: no decode threads competing with model
        threads, no barrier between the model's threads after every layer.
        """

        def work(start: int):
            done = []
            for i in range(start, min(start + CPU_CHUNK, len(sources))):
                try:
                    done.append((i, self.load(sources[i]), None))
                except ImageError as exc:
                    done.append((i, None, exc))
            indices = [i for i, _, err in done if err is None]
            errs = [(i, err) for i, _, err in done if err is not None]
            if not indices:
                return indices, np.zeros((0, self.dim), np.float32), errs
            pixels = np.stack([a for _, a, err in done if err is None])
            return indices, self.run(pixels, alone=len(sources) == 1), errs

        starts = iter(range(0, len(sources), CPU_CHUNK))
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="lookalike-featurize") as pool:
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


class _OnnxRuntime:
    """ONNX Runtime on CPU, with the model exported once and cached."""

    name = "onnxruntime"

    def __init__(self, spec: ModelSpec, weights: Weights, threads: int):
        import onnxruntime as ort

        path = onnx_path(spec, weights)
        if not path.is_file():
            export_onnx(spec, weights, path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = 1  # featurize runs `threads` calls at once, one per core
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a damaged cache file: export again once
            path.unlink(missing_ok=True)
            export_onnx(spec, weights, path)
            try:
                self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc2:
                raise ModelError(f"{path}: ONNX Runtime cannot load the exported model ({exc2})") from exc
        self.input = self.session.get_inputs()[0].name
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def run(self, pixels: np.ndarray) -> np.ndarray:
        if len(pixels) == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self.session.run(None, {self.input: pixels})[0], dtype=np.float32)


class _TorchCudaRuntime:
    """PyTorch on CUDA in half precision with channels_last memory format."""

    name = "torch-cuda-fp16"

    def __init__(self, spec: ModelSpec, weights: Weights):
        import torch

        if not torch.cuda.is_available():
            raise ModelError("device cuda asked for, but PyTorch sees no CUDA GPU", subject="cuda")
        self.torch = torch
        model = create_torch_model(spec, weights)
        self.model = model.to("cuda", memory_format=torch.channels_last).half().eval()
        self.dim = int(model.num_features)

    def run(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        if len(pixels) == 0:
            return np.zeros((0, self.dim), np.float32)
        with torch.inference_mode():
            x = torch.from_numpy(pixels).to("cuda", non_blocking=True)
            x = x.half().contiguous(memory_format=torch.channels_last)
            return self.model(x).float().cpu().numpy()


def onnx_path(spec: ModelSpec, weights: Weights) -> Path:
    """Where the exported model is cached: keyed by model, weights hash, input size, pooling, export version."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.name)
    pooling = "" if spec.pooling == "avg" else f"-{spec.pooling}"
    key = f"{safe}-{weights.sha256[:16]}-{spec.input_size}px{pooling}-v{EXPORT_VERSION}.onnx"
    return cache_dir() / "onnx" / key


def export_onnx(spec: ModelSpec, weights: Weights, path: Path) -> None:
    """Export the spec's feature model to ONNX at ``path``, atomically (temp file + rename)."""
    import torch

    model = _static_same_padding(create_torch_model(spec, weights), spec.input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, 3, spec.input_size, spec.input_size)
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
        raise ModelError(f"{spec.name}: export to ONNX failed ({type(exc).__name__}: {exc})", subject=spec.name) from exc
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
    """Rewrite the ONNX file at ``path``: constants folded, each zero Pad merged into its Conv's pads."""
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
    onnx.save(model, path)
