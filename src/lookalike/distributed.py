"""Featurization on Ray: images decoded in Ray Data tasks, the same Featurizer run by an actor pool.

``featurize_on_ray`` takes the catalog's images (as ``read_catalog`` checked them: one reader for
every format, and duplicate ids need the whole catalog) and hands them to Ray Data in blocks of
RAY_BLOCK. Tasks decode, resize and crop each block (``images.load_image`` and ``featurizer.crop``,
the single-process build's own steps, with the same image policy) and pass uint8 pixels on; an
actor pool normalises them and runs ``Featurizer.run``, one actor per CPU (each on one thread) or
per GPU. Results come back as blocks finish, in any order, with each input's position; an
unreadable image comes back as its ImageError, so the build skips and reports it exactly as a
single-process build does.

Without an address a local Ray is started for the build (and stopped after); with one the build
joins that cluster (``ray.init(address)``; "auto" finds a running one). Every node needs
lookalike and the model's weights package installed, as the driver has them. An int8 model (the
index's own file) travels to the actors through Ray's object store.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import errors
from .errors import ClusterError, ImageError
from .featurizer import CPU_CHUNK, Featurizer, crop, normalize
from .images import DEFAULT_POLICY, ImagePolicy, load_image
from .models import Weights
from .runtimes import cpu_count
from .types import ModelSpec

RAY_BLOCK = 64  # at most this many images per decode task and per actor call
CONNECT_TIMEOUT = 5.0  # seconds to reach a cluster's address
DECODE_CPUS = 0.25  # logical CPUs a decode task asks for: decoding is light beside the model


def _decode(batch: dict[str, np.ndarray], spec: ModelSpec, policy: ImagePolicy, cwd: str) -> dict[str, np.ndarray]:
    """A block of images -> their crops (zeros where unreadable) and errors (class name and message;
    empty where read).

    Relative image paths are the catalog's, relative to the driver's folder: the worker works
    there too where that folder exists (so errors read as the single-process build's)."""
    if os.getcwd() != cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    n = len(batch["position"])
    pixels = np.zeros((n, spec.input_size, spec.input_size, 3), np.uint8)  # a quarter of float32's bytes to move
    kinds, messages = [""] * n, [""] * n
    for j, source in enumerate(batch["image"]):
        try:
            pixels[j] = crop(load_image(str(source), policy=policy, draft_size=spec.resize_size), spec)
        except ImageError as exc:  # as its class name and message: Ray Data columns are plain arrays
            kinds[j], messages[j] = type(exc).__name__, str(exc)
    return {"position": batch["position"], "pixels": pixels, "error_kind": np.array(kinds), "error": np.array(messages)}


def _error(kind: str, message: str) -> ImageError:
    """The ImageError a task caught, made again in the driver."""
    cls = getattr(errors, kind, ImageError)
    return cls(message) if isinstance(cls, type) and issubclass(cls, ImageError) else ImageError(message)


class _Featurize:
    """A Ray actor: one Featurizer, on one thread (CPU) or one GPU."""

    def __init__(self, spec: ModelSpec, weights: Weights, device: str, runtime: str, precision: str,
                 model_ref: Any, policy: ImagePolicy, batch_size: int):
        model_file = None
        if model_ref is not None:  # the index's int8 model, from the object store
            import ray

            handle, model_file = tempfile.mkstemp(suffix=".onnx", prefix="lookalike-int8-")
            with os.fdopen(handle, "wb") as f:
                f.write(ray.get(model_ref))
        try:
            self.featurizer = Featurizer(spec, weights, device=device, batch_size=batch_size, threads=1, policy=policy,
                                         runtime=runtime if device == "cpu" else "auto",
                                         precision=precision if device == "cpu" else "fp32", model_file=model_file)
        finally:
            if model_file is not None:  # the runtime holds the model now
                os.unlink(model_file)
        # One call now, while the first block decodes: a runtime's first call is slow (buffers, kernels).
        size = spec.input_size
        self.featurizer.run(np.zeros((CPU_CHUNK if device == "cpu" else 1, 3, size, size), np.float32))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error_kind"] == ""
        vectors = np.zeros((len(ok), self.featurizer.dim), np.float32)
        spec = self.featurizer.spec
        pixels = np.stack([normalize(p, spec) for p in batch["pixels"][ok]]) if ok.any() else None
        step = CPU_CHUNK if self.featurizer.device == "cpu" else self.featurizer.batch_size
        if pixels is not None:  # in the chunks the single-process build runs
            vectors[ok] = np.concatenate([self.featurizer.run(pixels[i:i + step]) for i in range(0, len(pixels), step)])
        return {"position": batch["position"], "vector": vectors, "error_kind": batch["error_kind"], "error": batch["error"]}


def featurize_on_ray(
    sources: Sequence[str],
    positions: Sequence[int],
    *,
    spec: ModelSpec,
    weights: Weights,
    runtime: str,
    precision: str,
    device: str = "cpu",
    policy: ImagePolicy = DEFAULT_POLICY,
    batch_size: int = 32,
    model_file: str | os.PathLike | None = None,
    address: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, ImageError]]]]:
    """Featurize ``sources`` on Ray; yield (positions, vectors, [(position, error)]) per finished
    block, ``positions`` being those given for the sources. ``runtime`` and ``precision`` are the
    ones the driver's Featurizer chose (not ``auto``: every actor runs the same)."""
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ClusterError("--ray needs Ray: pip install 'lookalike[ray]'") from exc
    started = _connect(ray, address)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if device == "cuda" else 0
        if device == "cuda" and not gpus:
            raise ClusterError(f"device cuda on Ray: the cluster at {address or 'this machine'} has no GPU", subject=address)
        actors = gpus or max(1, int(ray.cluster_resources().get("CPU", cpu_count())))
        model_ref = ray.put(Path(model_file).read_bytes()) if model_file is not None else None
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        rows = [{"position": int(p), "image": str(s)} for p, s in zip(positions, sources)]
        if not rows:
            return
        # Blocks of at most RAY_BLOCK, as many as a multiple of the actors, so that they finish together
        # (coil-100's 1,200 images: 20 of 60 rather than 19 of 64 and one actor idle at the end).
        blocks = math.ceil(math.ceil(len(rows) / RAY_BLOCK) / actors) * actors
        block = math.ceil(len(rows) / blocks)
        dataset = ray.data.from_items(rows, override_num_blocks=math.ceil(len(rows) / block))
        dataset = dataset.map_batches(_decode, fn_kwargs={"spec": spec, "policy": policy, "cwd": os.getcwd()},
                                      batch_size=block, batch_format="numpy", num_cpus=DECODE_CPUS)
        with warnings.catch_warnings():  # max_restarts has no named parameter of its own yet
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = dataset.map_batches(
                _Featurize, fn_constructor_kwargs={"spec": spec, "weights": weights, "device": device, "runtime": runtime,
                                                   "precision": precision, "model_ref": model_ref, "policy": policy,
                                                   "batch_size": batch_size},
                max_restarts=0,  # an actor lost fails the build; the shards saved so far make --resume quick
                batch_size=block, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                # one actor per CPU, each asking a little less than one, so decode tasks fit beside them
                num_cpus=0 if gpus else 1 - DECODE_CPUS / 2, num_gpus=1 if gpus else 0,
            )
        for block in dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            ok = block["error_kind"] == ""
            failed = zip(block["position"][~ok], block["error_kind"][~ok], block["error"][~ok])
            errors = [(int(p), _error(str(kind), str(message))) for p, kind, message in failed]
            yield block["position"][ok].astype(np.int64), block["vector"][ok].astype(np.float32), errors
            if progress:
                progress(len(ok))
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str) -> None:
    """A host:port (or ray://host:port) nobody answers at fails in seconds, not after Ray's long retries."""
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise ClusterError(f"Ray at {address}: nothing answers there ({exc.strerror or exc}); start the cluster "
                           "(`ray start --head`) or check the address", subject=address) from None


def _start_local(ray, options: dict[str, Any]) -> None:
    """A new Ray on this machine's CPUs: "local", or ray.init would join a cluster `ray start` left
    running here (and refuse num_cpus). Its start is tried twice: on a busy machine the raylet
    can miss Ray's 30 s to register."""
    try:
        ray.init(address="local", num_cpus=cpu_count(), **options)
    except Exception:
        ray.shutdown()
        ray.init(address="local", num_cpus=cpu_count(), **options)


def _connect(ray, address: str | None) -> bool:
    """Join ``address`` (or the Ray this process already has), else start a local one; True if started here."""
    if ray.is_initialized():
        return False
    for name in ("ray", "ray.data"):  # the build reports progress and problems itself
        logging.getLogger(name).setLevel(logging.ERROR)
    options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, **options)
        else:
            _start_local(ray, options)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError: Ray's own, by version
        hint = ("; a cluster with token authentication also needs RAY_AUTH_MODE=token here, and its token "
                "(RAY_AUTH_TOKEN, or ~/.ray/auth_token)" if address and address != "auto" else "")
        raise ClusterError(f"Ray at {address or 'a new local cluster'}: cannot start or join it ({exc}){hint}",
                           subject=address) from exc
    return True
