"""VisualSearch: the one object every front end calls (build, open, search, add, remove, classify, evaluate, finetune).

It is the only module that knows all the others: it reads catalogs, runs the featurizer,
keeps the vector index and the item table of one index directory in step, and turns FAISS
results into hits with metadata.

    >>> vs = VisualSearch.build("shop/catalog.csv", "shop-index")       # doctest: +SKIP
    >>> vs.search("photo.jpg", k=3).hits[0].metadata["title"]          # doctest: +SKIP
    >>> vs.search(["a.jpg", "b.jpg"], filter={"label": "mug"})          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import __version__
from .catalog import check_unique, read_catalog
from .checkpoint import SHARD_ITEMS, BuildCheckpoint, file_stamps, fingerprint
from .errors import BackendError, CatalogError, ClusterError, ImageError, IndexError_, ModelError, QueryError, StoreError
from .evaluate import combine, per_query
from .featurizer import GRID, REGIONS, TURNS, Featurizer, cache_dir, cpu_count, make_int8_model, moving_average
from .finetune import HEAD_DIM, VAL_FRACTION, VIEWS, FinetuneReport
from .finetune import finetune as finetune_model
from .images import DEFAULT_POLICY, ImagePolicy, describe, load_image
from .backends import create_index, index_class, load_index
from .index import IndexWarning, check_spec, check_vectors, parse_size, plan_for_memory, prepare
from .local import LOCAL_ENTRY, MIN_INLIERS, VOTE_CACHE_MIN, VOTE_MAX_DESCRIPTORS, DescriptorVote, LocalFeatures
from .local import extract as extract_local
from .local import extract_query, one_blas_thread
from .local import inliers as local_inliers
from .models import (DEFAULT_MODEL, Weights, file_sha256, get_spec, read_model_config, resolve_weights,
                     spec_from_manifest, with_features)
from .runtimes import check_choice, int8_saturates, native_bf16
from .store import MANIFEST, IndexDir, ItemTable
from .synthetic import backgrounds_in
from .types import Hit, IndexSpec, Item, ModelSpec, SearchResult

QE_ALPHA = 3.0  # query expansion: a neighbour's weight is its score to the query ** QE_ALPHA
MAX_EXPAND = 50
VERIFY_SHORTLIST = 20  # candidates from the global search that geometric verification looks at
ORIENT_MARGIN = 0.05  # a turned query photo wins when its best hit scores this much above the upright one's
# A query's hits are "unsure" when the best is not verified and scores below this (cosine). The
# camera's second looks are taken only then: orient="auto" tries the photo turned (the best turn
# wins with no margin, since the upright search already failed), then regions="auto" adds the finer
# grid of squares at that turn. Chosen on benchmarks/camera.py's photos (a one-off scan of cached
# vectors, verification on): with both looks, camera-sim recall@1 at 0.55 / 0.58 / 0.6 / 0.65 was
# 0.943 / 0.950 / 0.953 / 0.955 and grocery-iconic 0.521 / 0.516 / 0.514 / 0.514, at a mean of 12.9
# / 14.7 / 15.9 / 17.6 model runs per photo (6 when sure); turning alone at 0.5 gave 0.920 / 0.512.
UNSURE = 0.6
CAMERA_BUDGET_MS = 150.0  # a live camera query's time budget: its second looks are taken only when they fit in it
ORIENTS = (False, True, "auto")
REGION_MODES = (False, True, "auto")
INT8_MODEL = "model-int8.onnx"  # an int8 index's own quantized model, in its directory
INT8_CALIBRATION = 64  # catalog images (evenly spaced) that calibrate an int8 model

DOCTOR_TRIES = 5  # checks doctor makes while other processes keep committing changes under it
ProgressFactory = Callable[[int], Any]  # total -> object with update(n) and close(), e.g. tqdm


def _tqdm_factory(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="featurizing", mininterval=0.5, dynamic_ncols=True)


def _progress(progress: "bool | ProgressFactory | None") -> "ProgressFactory | None":
    """True: a tqdm bar on stderr (items/s, ETA); a callable: the caller's own; else none."""
    if progress is True:
        return _tqdm_factory
    return progress or None


@dataclass
class Report:
    """What a build or an add did: items indexed, items skipped with their reasons, time taken."""

    indexed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item id, reason)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    resumed: int = 0  # items whose vectors an interrupted build had saved (build --resume)

    def summary(self) -> str:
        rate = self.indexed / self.seconds if self.seconds > 0 else 0.0
        text = f"indexed {self.indexed} items, skipped {len(self.skipped)}"
        if self.skipped:
            kinds: dict[str, int] = {}
            for _, reason in self.skipped:
                kinds[reason.split(":")[0]] = kinds.get(reason.split(":")[0], 0) + 1
            text += " (" + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")"
        if self.resumed:
            text += f", {self.resumed} of them featurized by the interrupted build"
        return text + f", in {self.seconds:.1f} s ({rate:.1f} items/s)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "indexed": self.indexed,
            "skipped": [{"id": i, "reason": r} for i, r in self.skipped],
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
            "resumed": self.resumed,
        }


def _reason(exc: ImageError) -> str:
    kind = {
        "ImageNotFoundError": "missing",
        "ImageFormatError": "unreadable",
        "ImageTooLargeError": "too large",
        "ImageFetchError": "not fetched",
    }.get(type(exc).__name__, "unreadable")
    return f"{kind}: {exc}"


class VisualSearch:
    """A built index directory, opened: search it by image or vector, change it, measure it."""

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu", policy: ImagePolicy = DEFAULT_POLICY,
                 runtime: str = "auto"):
        self.path = Path(path)
        self.device = device
        self.policy = policy
        self.runtime = runtime
        self._store = IndexDir(self.path)
        self._featurizer: Featurizer | None = None
        self._items: ItemTable | None = None
        self._pool: ThreadPoolExecutor | None = None  # geometric verification, on every core
        self._vote: tuple[int, DescriptorVote | None] | None = None  # (generation, the descriptor vote)
        self._vote_lock = threading.Lock()
        self._featurizer_lock = threading.Lock()
        self._look_search_ms: float | None = None  # moving average of a second look's search (``search_featurized``)
        self.build_report: Report | None = None
        self._reload()

    # --- opening and building --------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, device: str = "cpu", policy: ImagePolicy = DEFAULT_POLICY,
             runtime: str = "auto") -> "VisualSearch":
        """Open an index directory written by ``build``; StoreError if it is missing or damaged.

        ``runtime`` runs the model for queries and additions, at the precision the index was
        built with (``runtimes.RUNTIMES``; ``auto``: the fastest here)."""
        return cls(path, device=device, policy=policy, runtime=runtime)

    @classmethod
    def build(
        cls,
        catalog: str | os.PathLike | Sequence[Item],
        path: str | os.PathLike,
        *,
        model: str = DEFAULT_MODEL,
        metric: str = "cosine",
        index: str | None = None,
        batch_size: int = 32,
        weights: str | os.PathLike | None = None,
        device: str = "cpu",
        strict: bool = False,
        force: bool = False,
        progress: bool | ProgressFactory | None = None,
        policy: ImagePolicy = DEFAULT_POLICY,
        crop_pct: float | None = None,
        pooling: str | None = None,
        tta: str | None = None,
        whiten: int = 0,
        local_features: bool = False,
        runtime: str = "auto",
        precision: str = "auto",
        max_memory: int | str | None = None,
        resume: bool = False,
        backend: str = "faiss",
        milvus_uri: str | None = None,
        collection: str | None = None,
        ray: bool | str | None = None,
    ) -> "VisualSearch":
        """Featurize a catalog and write a new index directory at ``path``.

        Unreadable images are skipped and listed in ``.build_report`` (an error if ``strict``).
        ``crop_pct``, ``pooling`` and ``tta`` say how features are made (None: the defaults of
        ``models.DEFAULT_FEATURES``); the manifest records them and every query uses the same.
        ``whiten``: PCA-whiten to that many dimensions, learned from the catalog (0: off; see
        ``index.plan``). ``max_memory`` (bytes, or a size such as "2GB"; implies ``index="auto"``):
        the kind is chosen from the catalog size and this budget for the FAISS structure, its
        search parameters tuned to recall@10 >= 0.95 against exact search on held-aside items, and
        ``info()`` says what was chosen, why, its memory and the recall measured
        (``index.plan_for_memory``). ``local_features``: also store each image's SIFT features, so that
        searches verify their best candidates geometrically (``local``; slower to build).
        ``runtime`` and ``precision`` say how the model runs (``runtimes``); int8 quantizes the
        model on INT8_CALIBRATION of the catalog's images and keeps it in the index directory,
        and every later query and addition of the index runs it. Precision ``auto``: the fastest
        here of ``runtimes.AUTO_PRECISIONS`` (fp32, and bf16 where the CPU has it natively), the
        precisions that keep recall@1 within 0.005 of fp32 on every shared protocol.
        Vectors are saved in shards beside ``path`` as featurization goes (``checkpoint``); a
        build killed part way goes on with ``resume=True`` (same catalog and options), which
        featurizes only what is missing and gives the same index as an uninterrupted build.
        ``backend="milvus"`` keeps the index in a Milvus collection (``collection``, default
        lookalike_<directory name>) of ``milvus_uri``: a Milvus Lite file (``*.db``) or a server's
        address; the manifest records it and every later use of the index goes there
        (``backends.milvus``). ``ray``: featurize on Ray (``distributed``): True starts a local Ray
        for the build, an address joins that cluster; the index is the one a build here makes.
        """
        start = time.perf_counter()
        if max_memory is not None:
            if index not in (None, "auto"):
                raise IndexError_(f"index kind {index!r} and a memory budget: give one or the other "
                                  "(the budget chooses the kind)", subject=index)
            index = "auto"
            parse_size(max_memory)
        index = index or "flat"
        check_spec(index, metric, auto=True)
        if index == "auto" and max_memory is None:
            raise IndexError_("index kind auto needs a memory budget (max_memory, e.g. '2GB')", subject=index)
        spec = with_features(get_spec(model), crop_pct=crop_pct, pooling=pooling, tta=tta)
        items = _items(catalog)
        _check_target(Path(path), force)
        where = _backend_entry(backend, milvus_uri, collection, path, index, whiten)
        resolved = resolve_weights(spec, weights)
        if device != "cpu" and precision == "auto":
            precision = "fp32"  # CUDA runs fp16 whatever is asked of the CPU
        if device == "cpu":
            check_choice(runtime, precision)
        checkpoint = BuildCheckpoint(path)
        options = {"model": asdict(spec), "weights": resolved.sha256, "device": device, "precision": precision,
                   "runtime": runtime, "batch_size": batch_size, "strict": strict, "policy": asdict(policy)}
        meta = checkpoint.start(fingerprint(items, options), resume)
        try:
            model_file, calibrated = None, 0
            if precision == "int8" and device == "cpu":
                model_file = checkpoint.path / INT8_MODEL
                if not (resume and "calibrated" in meta and model_file.exists()):  # resumed: the model it began with
                    spread = np.unique(np.linspace(0, len(items) - 1, min(len(items), INT8_CALIBRATION)).round().astype(int))
                    partial = model_file.with_name(model_file.name + ".tmp")  # whole, or not there
                    meta["calibrated"] = make_int8_model(spec, resolved, [items[i].image for i in spread], partial, policy)
                    os.replace(partial, model_file)
                calibrated = int(meta.get("calibrated", 0))
            featurizer = Featurizer(spec, resolved, device=device, batch_size=batch_size, policy=policy,
                                    runtime=meta.get("runtime", runtime), precision=meta.get("precision", precision),
                                    model_file=model_file)
            checkpoint.update(meta, runtime=featurizer.runtime, precision=featurizer.precision)
            if index == "auto":  # a budget nothing fits in fails now, not after featurizing
                planned = plan_for_memory(metric, len(items), featurizer.dim, max_memory)
                if where and planned.kind == "ivfpq":
                    raise IndexError_(f"a budget of {max_memory} needs ivfpq for {len(items)} items, which the "
                                      "milvus backend does not offer: give it more memory or choose a kind",
                                      subject=max_memory)
            on_ray = None if ray in (None, False) else {"address": ray if isinstance(ray, str) and ray else None}
            vectors, kept, report = _featurize_in_shards(featurizer, items, strict, _progress(progress), checkpoint, on_ray)
            if not kept:
                raise _none_read(catalog, items, report)
            _check_finite(vectors, spec.name)
            vectors = prepare(vectors, metric)
            int_ids = np.arange(1, len(kept) + 1, dtype=np.int64)
            local = _local_blobs(kept, int_ids, policy, _progress(progress)) if local_features else None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", IndexWarning)
                vindex = create_index(index, metric, vectors, int_ids, whiten=whiten, max_memory=max_memory,
                                      backend=where, metadata=[it.metadata for it in kept] if where else None)
            report.warnings.extend(str(w.message) for w in caught)
            manifest = {
                "lookalike_version": __version__,
                "model": _model_entry(spec, resolved, featurizer, model_file, calibrated),
                "metric": metric,
                "index": vindex.spec.to_dict(),
                "next_int_id": int(int_ids[-1]) + 1 if len(int_ids) else 1,
                "source": _name(catalog),
            }
            if local_features:
                manifest["local_features"] = LOCAL_ENTRY
            try:
                IndexDir.create(
                    path, manifest, list(zip(int_ids.tolist(), kept)), vindex.vectors, vindex.ids, vindex.write_faiss,
                    overwrite=force, local=local, model_files={model_file.name: model_file} if model_file else None,
                )
            except BaseException:
                if where:
                    vindex.discard()  # the staging collection: the old index (if any) keeps its own
                raise
            vindex.committed()
            checkpoint.discard()  # the index holds it all now
        except BackendError:  # Milvus refused or went away: the shards make --resume quick
            raise
        except StoreError:  # a full disk, most often: the shards would only take more of it
            checkpoint.discard()
            raise
        finally:
            checkpoint.release()
        report.indexed = len(kept)
        report.seconds = time.perf_counter() - start
        vs = cls(path, device=device, policy=policy, runtime=featurizer.runtime if device == "cpu" else "auto")
        if model_file is None:  # an int8 featurizer's model file was the checkpoint's: reopen the index's own
            vs._featurizer = featurizer
        vs.build_report = report
        return vs

    @classmethod
    def finetune(
        cls,
        catalogs: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[Item],
        out: str | os.PathLike,
        *,
        label: str = "label",
        model: str = DEFAULT_MODEL,
        epochs: int = 10,
        device: str = "cpu",
        dim: int = HEAD_DIM,
        views: int = VIEWS,
        backgrounds: str | os.PathLike | None = None,
        val_fraction: float = VAL_FRACTION,
        seed: int = 0,
        force: bool = False,
        progress: bool | Callable[[int, str], Any] | None = None,
        say: Callable[[str], None] | None = None,
        policy: ImagePolicy = DEFAULT_POLICY,
    ) -> FinetuneReport:
        """Fine-tune ``model`` on one or more labelled catalogs (their items grouped by the metadata
        field ``label``) and write a model directory at ``out``, which ``build(model=out)`` uses.

        ``backgrounds``: a folder of background photos; half the training views are then the
        catalog pictures pasted into them as synthetic camera photos. ``progress``: True for tqdm
        bars, or ``callable(total, what)`` returning an object with ``update(n)`` and ``close()``;
        ``say(line)`` gets the validation recall@1 before training and after each epoch. The
        recipe, the split and the directory's format are in ``finetune``'s docstring.
        """
        if isinstance(catalogs, (str, os.PathLike)):
            catalogs = [catalogs]
        catalogs = list(catalogs)
        if catalogs and all(isinstance(c, Item) for c in catalogs):
            items, name = _items(catalogs), "<items>"
        else:
            items = [it for c in catalogs for it in _items(c)]
            name = ", ".join(_name(c) for c in catalogs) or "<no catalog>"
        seen: dict[str, Item] = {}
        for it in items:  # one picture twice: its copy held out for validation would measure nothing
            if it.image in seen:
                raise CatalogError(f"{it.image}: in the fine-tuning catalogs twice ({seen[it.image].row} and {it.row}); "
                                   "give each picture once", subject=it.image)
            seen[it.image] = it
        if progress is True:
            from tqdm import tqdm

            progress = lambda total, what: tqdm(total=total, desc=what, unit="img", mininterval=0.5,  # noqa: E731
                                                dynamic_ncols=True, leave=False)
        return finetune_model(
            items, out, label=label, base=model, catalog_name=name, epochs=epochs, device=device, head_dim=dim,
            views=views, backgrounds=backgrounds_in(backgrounds) if backgrounds else (), val_fraction=val_fraction,
            seed=seed, force=force, policy=policy, progress=progress or None, say=say,
        )

    @classmethod
    def doctor(cls, path: str | os.PathLike, *, repair: bool = True) -> dict[str, Any]:
        """Check an index directory file by file; rebuild its FAISS file from the stored vectors
        when that is all that is wrong. Returns {"path", "ok", "problems", "repaired"}."""
        store = IndexDir(path)

        def check() -> list[dict[str, Any]]:
            problems = store.diagnose()
            if not problems:  # every file matches its hash: FAISS must also read back
                manifest, vectors, ids, faiss_path = store.load()
                ispec = IndexSpec(**dict(manifest["index"], metric=manifest["metric"]))
                vindex, intact = load_index(ispec, int(manifest["model"]["dim"]), vectors, ids, str(faiss_path))
                if not intact and ispec.backend:
                    problems.append({"file": ispec.backend.get("collection", "?"), "problem": vindex.problem(), "fixable": True})
                elif not intact:
                    problems.append({"file": faiss_path.name, "problem": "FAISS cannot read it", "fixable": True})
            return problems

        def checked() -> list[dict[str, Any]]:
            try:
                return check()
            except (StoreError, OSError) as exc:  # OSError: a file gone while it was read
                return [{"file": MANIFEST, "problem": str(exc), "fixable": False}]

        for _ in range(DOCTOR_TRIES):  # a writer that committed meanwhile deleted the files being checked: again
            stamp = store.stamp()
            problems = checked()
            if not problems or store.stamp() == stamp:
                break
        else:  # writers kept committing: once more while they wait
            with store.lock():
                problems = checked()
        repaired = []
        if problems and repair and all(p["fixable"] for p in problems):
            with store.lock():
                manifest, vectors, ids, _ = store.load(check_faiss=False)
                ispec = IndexSpec(**dict(manifest["index"], metric=manifest["metric"]))
                cls = index_class(ispec.backend)
                if ispec.backend:
                    table = ItemTable(store, int(manifest["generation"]))
                    try:
                        rows = table.rows(ids)
                    finally:
                        table.close()
                    vindex = cls(ispec, int(manifest["model"]["dim"]), vectors, ids, metadata=[rows[int(i)][3] for i in ids])
                    vindex.committed()
                    repaired = [f"rebuilt collection {ispec.backend['collection']} from the {len(ids)} stored vectors"]
                else:
                    vindex = cls(ispec, int(manifest["model"]["dim"]), vectors, ids)
                    store.replace_faiss(manifest, vindex.write_faiss)
                    repaired = [f"rebuilt index-{manifest['generation']}.faiss from the {len(ids)} stored vectors"]
            problems = store.diagnose()
        return {"path": str(path), "ok": not problems, "problems": problems, "repaired": repaired}

    def _reload(self) -> None:
        """(Re)read the current generation from disk. An index rebuilt in its place (``build
        --force``, perhaps with another model) also drops what came from the old one: the model,
        the descriptor vote and the second looks' pace."""
        manifest, vectors, ids, faiss_path = self._store.load()
        old = getattr(self, "manifest", None)
        if old is not None and old.get("build_id") != manifest.get("build_id"):
            self._featurizer, self._vote, self._look_search_ms = None, None, None
        self.manifest = manifest
        self.spec: ModelSpec = spec_from_manifest(manifest["model"])
        self.metric: str = manifest["metric"]
        ispec = IndexSpec(**dict(manifest["index"], metric=self.metric))
        self._index, from_file = load_index(ispec, int(manifest["model"]["dim"]), vectors, ids, str(faiss_path))
        if not from_file and ispec.backend:
            raise StoreError(f"{self.path}: {self._index.problem()}; `lookalike doctor {self.path}` rebuilds it "
                             "from the stored vectors", subject=str(self.path))
        if not from_file:
            raise StoreError(
                f"{faiss_path}: FAISS cannot read it or it does not match the vectors; "
                f"`lookalike doctor {self.path}` rebuilds it from the stored vectors",
                subject=str(faiss_path),
            )
        # The old table is not closed here: searches on other threads may still be reading it (closing
        # a connection under them crashed the process); it closes when the last of them lets go.
        self._items = ItemTable(self._store, int(manifest["generation"]))

    def stale(self) -> bool:
        """Whether another process committed a newer generation than the one this object reads,
        or rebuilt the index in its place."""
        current = self._store.manifest()
        return (current["generation"], current.get("build_id")) != (self.generation, self.manifest.get("build_id"))

    def refresh(self) -> bool:
        """Pick up changes another process committed since this one opened; True if there were."""
        if not self.stale():
            return False
        self._reload()
        return True

    def close(self) -> None:
        """Let go of the files and connections this object holds (a Milvus Lite file: for other
        processes); using it afterwards is a StoreError that says so."""
        if getattr(self, "_index", None) is not None and not isinstance(self._index, _Closed):
            self._index.close()
            self._index = _Closed(self.path)
        if isinstance(self._items, ItemTable):
            self._items.close()
            self._items = _Closed(self.path)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=cpu_count(), thread_name_prefix="lookalike-verify")
        return self._pool

    def __enter__(self) -> "VisualSearch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._index)

    @property
    def dim(self) -> int:
        return int(self.manifest["model"]["dim"])

    @property
    def featurizer(self) -> Featurizer:
        """The model the index was built with (loaded on first use, once however many threads ask
        at once; weights must match)."""
        if self._featurizer is None:
            with self._featurizer_lock:
                if self._featurizer is None:
                    self._featurizer = self._load_featurizer()
        return self._featurizer

    def _load_featurizer(self) -> Featurizer:
        entry = self.manifest["model"]
        w = entry.get("weights", {})
        path = w.get("path") if w.get("source") == "file" else None
        if w.get("source") == "file" and path and not Path(path).is_file():
            raise ModelError(f"{self.path}: built with weights {path}, which no longer exist", subject=path)
        resolved = resolve_weights(self.spec, path)
        if w.get("sha256") and resolved.sha256 != w["sha256"]:
            raise ModelError(
                f"{self.path}: built with {self.spec.name} weights {w['sha256'][:12]}, but the weights found "
                f"now ({resolved.path}) are {resolved.sha256[:12]}; rebuild the index or install the same weights",
                subject=str(self.path),
            )
        precision, model_file = entry.get("precision", "fp32"), None
        if precision == "fp16":  # built on CUDA: the same fp32 model on the CPU
            precision = "fp32"
        if precision == "bf16" and self.device == "cpu" and not native_bf16():
            warnings.warn(f"{self.path}: built in bf16, which this CPU does not compute natively; "
                          "its queries run in fp32 (the same model, vectors within rounding)", stacklevel=3)
            precision = "fp32"
        if precision == "int8" and self.device == "cpu" and int8_saturates():
            warnings.warn(f"{self.path}: built in int8, whose arithmetic overflows on this CPU (no VNNI); its "
                          "queries run in fp32 (vectors about 0.99 cosine to the stored ones)", stacklevel=3)
            precision = "fp32"
        if precision == "int8":
            model_file = self._int8_model(entry.get("model_file") or {})
        return Featurizer(self.spec, resolved, device=self.device, policy=self.policy,
                          runtime=self.runtime, precision=precision, model_file=model_file)

    def warm_up(self) -> None:
        """Make the first query as fast as the ones after it (``serve`` calls this at start-up):
        load the model and run it at every batch size a query uses (a whole picture; a camera
        photo's turns, regions and grid), since OpenVINO compiles a model for each batch size on
        its first use, and make the descriptor vote of an index with local features."""
        blank = Image.new("RGB", (self.spec.input_size,) * 2, (128, 128, 128))
        featurizer = self.featurizer
        featurizer.featurize([blank], strict=True)
        featurizer.featurize_turned([blank])
        featurizer.featurize_regions([blank])
        featurizer.featurize_regions([blank], grid=True)
        if self.has_local_features:
            self._descriptor_vote()

    def _int8_model(self, info: dict[str, Any]) -> Path:
        """The index's own int8 model, checked against the manifest's hash."""
        path = self.path / str(info.get("name", INT8_MODEL))
        if not path.is_file() or file_sha256(path) != info.get("sha256"):
            raise ModelError(f"{path}: the index's int8 model is missing or damaged; rebuild the index "
                             "with `lookalike build --precision int8`", subject=str(path))
        return path

    # --- searching -----------------------------------------------------------------------

    def featurize(self, queries: Any) -> np.ndarray:
        """Query inputs (images or vectors, one or a list) as float32 [n, dim] raw vectors."""
        sources, _ = self._as_list(queries)
        return self._vectors(sources)

    def search(
        self,
        queries: Any,
        k: int = 5,
        filter: dict[str, Any] | None = None,
        min_score: float | None = None,
        expand: int = 0,
        orient: bool | str = False,
        verify: bool | None = None,
        regions: bool | str = False,
        budget_ms: float | None = None,
    ):
        """The k most similar items of each query, most similar first.

        ``queries``: a path, URL, bytes, PIL image, HxWx3 array or feature vector, or a list
        of them. Returns a SearchResult for one query, a list of them for a list.
        ``filter``: metadata equality (a list value means any of), applied inside the search.
        ``min_score``: hits scoring below it are dropped, so "nothing like it" is an empty list.
        ``expand``: query expansion over that many nearest items (0 = off); the scores are then
        similarities to the expanded query.
        ``orient``: also try each query image turned by 90, 180 and 270 degrees (a photo taken
        with the camera on its side) and keep the turn whose best hit scores ORIENT_MARGIN
        above the upright one's; about 4x the featurizing time. ``orient="auto"``: only a query
        whose hits are ``unsure`` (the best neither verified nor scoring UNSURE) is tried
        turned, after its upright search, and the turn whose best hit (best region) scores highest
        is kept: the live camera's choice, which costs nothing on a photo that is found upright.
        ``verify``: geometric verification of the best VERIFY_SHORTLIST candidates against the
        query's local features (``local.extract_query``; default: when the index was built with
        local features); hits verified by enough inliers come first, the others keep their order.
        ``min_score`` never drops a verified hit.
        ``regions``: also search with regions of each query image (``featurizer.region_boxes``:
        the whole picture, and squares of REGION_SCALE of it at the corners and the centre) and
        score each item by its best region: an item that fills only part of a camera's frame is
        found far more often; REGIONS model runs without the flip averaging, about 3x a query's
        featurizing time. With ``orient=True``, the turn is chosen first, on the whole picture.
        ``regions="auto"``: the same regions, and for a query whose hits are still ``unsure``
        (after ``orient="auto"``'s turn) a second look with GRID x GRID smaller squares
        (``featurizer.grid_boxes``) at its turn, which finds an item too small for the regions:
        the live camera's choice (``search_featurized`` is it for callers that featurize).
        ``budget_ms``: with either "auto", each query's time budget (the live camera's
        CAMERA_BUDGET_MS): its second looks are taken only while they are expected to fit in it
        (``search_featurized``); a query's clock includes its share of the first look.
        """
        start = time.perf_counter()
        _check_k(k)
        _check_expand(expand)
        _check_orient(orient)
        _check_regions(regions)
        self.check_budget(budget_ms, orient, regions)
        min_score = _plain(min_score)
        if min_score is not None and not (isinstance(min_score, (int, float)) and not isinstance(min_score, bool)
                                          and math.isfinite(min_score)):
            raise QueryError(f"min_score must be a finite number, got {min_score!r}")
        sources, single = self._as_list(queries)
        names = self._names(sources)
        pending = None
        if self._verifying(verify):  # decode once; local features are extracted while the model runs
            sources = [s if _is_vector(s) else load_image(s, policy=self.policy) for s in sources]
            pending = [None if _is_vector(s) else self._workers().submit(extract_query, s) for s in sources]
        turns = [0] * len(sources)
        if orient is True:
            turned = self._vectors(sources, turned=True)
            best = self._best_turn(turned, self._subset(filter))
            turns = [TURNS[t] for t in best]
            vectors = self._vectors(sources, turns=turns) if regions else turned[np.arange(len(best)), best]
        else:
            vectors = self._vectors(sources, turns=turns if regions else None)
        local = None if pending is None else [None if f is None else f.result() for f in pending]
        skipped: list[list[str]] = [[] for _ in sources]  # second looks the budget left out, per query
        if orient == "auto" or regions == "auto":  # one query at a time: each may take second looks
            share = (time.perf_counter() - start) / len(sources)  # of the first look, made for all at once
            found = [self._search_vectors(vectors[q][None], k, filter, expand)[0] if _is_vector(source) else
                     self.search_featurized(source, vectors[q], k=k, filter=filter, expand=expand,
                                            local=None if local is None else local[q], orient=orient, regions=regions,
                                            turn=turns[q], budget_ms=budget_ms, started=time.perf_counter() - share,
                                            skipped=skipped[q])
                     for q, source in enumerate(sources)]
        else:
            found = self._search_vectors(vectors, k, filter, expand, local)
        results = [SearchResult(q, self.passing(hits, min_score), None if budget_ms is None else tuple(left))
                   for q, hits, left in zip(names, found, skipped)]
        return results[0] if single else results

    def search_vectors(
        self,
        vectors: np.ndarray,
        k: int = 5,
        filter: dict[str, Any] | None = None,
        min_score: float | None = None,
        expand: int = 0,
        local: list[LocalFeatures | None] | None = None,
    ) -> list[list[Hit]]:
        """search() for callers that featurize themselves: vectors [n, dim], or [n, regions, dim]
        (``Featurizer.featurize_regions``: each item scored by its best region), and, to verify,
        each query's local features (``local.extract_query``; None for a query without)."""
        _check_k(k)
        _check_expand(expand)
        vectors = _query_vectors(vectors, self.dim)
        if local is not None and len(local) != len(vectors):
            raise QueryError(f"{len(vectors)} query vectors but {len(local)} local feature sets")
        if local is not None and not self.has_local_features:
            local = None
        return [self.passing(hits, min_score) for hits in self._search_vectors(vectors, k, filter, expand, local)]

    @property
    def one_process(self) -> bool:
        """Whether only one process at a time may open the index (it is in a Milvus Lite file)."""
        return self._index.one_process

    @property
    def has_local_features(self) -> bool:
        """Whether the index was built with local features for geometric verification."""
        return bool(self.manifest.get("local_features"))

    def _verifying(self, verify: bool | None) -> bool:
        if verify is None:
            return self.has_local_features
        if verify and not self.has_local_features:
            raise QueryError(f"{self.path}: built without local features, so it cannot verify; "
                             "build it with --local-features", subject=str(self.path))
        return bool(verify)

    def get(self, id: str) -> Item | None:
        """The item with this id as stored in the index (image reference and metadata), or None."""
        int_id = self._items.int_ids([str(id)]).get(str(id))
        if int_id is None:
            return None
        id_, label, image, metadata = self._items.rows([int_id])[int_id]
        return Item(id=id_, image=image or "", label=label, metadata=metadata)

    @property
    def generation(self) -> int:
        """The committed generation this object reads (it grows with every add and remove)."""
        return int(self.manifest["generation"])

    def _subset(self, filter: dict[str, Any] | None) -> np.ndarray | None:
        """The int ids a metadata filter allows (None: no filter)."""
        if not filter:
            return None
        if not isinstance(filter, dict):
            raise QueryError(f"filter must be a mapping of metadata field to value, got {type(filter).__name__}")
        filter = {key: [_plain(v) for v in value] if isinstance(value, (list, tuple, set)) else _plain(value)
                  for key, value in filter.items()}  # numpy's numbers as Python's
        for key, value in filter.items():
            for v in value if isinstance(value, (list, tuple, set)) else [value]:
                if not (v is None or isinstance(v, (str, int, float, bool))):
                    raise QueryError(f"filter {key!r}: compare with a string, number or boolean (or a list of them), "
                                     f"not a {type(v).__name__}", subject=key)
        filter = {key: [form for v in (value if isinstance(value, (list, tuple, set)) else [value]) for form in _spellings(v)]
                  for key, value in filter.items()}
        if self._index.filters_metadata:  # the backend runs the filter itself (e.g. a Milvus expression)
            return self._index.expression(filter)
        return self._items.matching(filter)

    def _search_vectors(
        self,
        vectors: np.ndarray,
        k: int,
        filter: dict[str, Any] | None,
        expand: int = 0,
        local: list[LocalFeatures | None] | None = None,
        looks: list[_Looks] | None = None,
    ) -> list[list[Hit]]:
        """Hits of query vectors [n, dim] or [n, regions, dim]. With ``local``, each query's
        shortlist is verified: the global best VERIFY_SHORTLIST, and when none of those verifies,
        the items its descriptors vote for too; ``looks`` keeps, per query, what that found, for
        the query's next look."""
        regions = vectors.shape[1] if vectors.ndim == 3 else 0
        flat = vectors.reshape(-1, vectors.shape[-1])
        if self.metric == "cosine" and not np.any(flat, axis=1).all():
            first = int(np.flatnonzero(~np.any(flat, axis=1))[0]) // max(regions, 1)
            raise QueryError(f"query {first + 1}: a vector of zeros has no direction, so cosine similarity "
                             "cannot rank the catalog by it", subject=first + 1)
        subset = self._subset(filter)
        if subset is not None and len(subset) == 0:
            return [[] for _ in range(len(vectors))]
        if expand:
            flat = self._expanded(flat, expand, subset=subset)
        shortlist = max(k, VERIFY_SHORTLIST) if local is not None else k
        scores, distances, int_ids = self._index.search(flat, shortlist, subset=subset)
        if regions:
            scores, distances, int_ids = _best_region(scores, distances, int_ids, regions)
        found = [(scores[q], distances[q], int_ids[q]) for q in range(len(vectors))]
        looks = looks or [_Looks() for _ in range(len(vectors))]
        inliers: list[np.ndarray | None] = [None] * len(vectors)
        for q in range(len(vectors)):
            if local is None or local[q] is None:
                continue
            voted = self._verify_shortlist(local[q], found[q][2], looks[q], subset)
            if len(voted):  # scored as the global search scores them
                rows = flat[q * max(regions, 1):(q + 1) * max(regions, 1)]
                more = self._index.search(rows, len(voted), subset=voted)
                more = _best_region(*more, regions) if regions else more
                found[q] = tuple(np.concatenate([a, b[0]]) for a, b in zip(found[q], more))
            inliers[q] = looks[q].counts(found[q][2])
        every = np.unique(np.concatenate([ids for _, _, ids in found]))
        rows = self._items.rows(every)
        if len(rows) < len(every[every >= 0]):
            raise StoreError(
                f"{self.path}: this reader is on generation {self.generation}, which other processes have changed "
                "too often since; call refresh() or open the index again",
                subject=str(self.path),
            )
        out = []
        for q, (q_scores, q_distances, q_ids) in enumerate(found):
            order = np.arange(len(q_ids)) if inliers[q] is None else _verified_first(inliers[q])
            hits = []
            for r, j in enumerate(order[:k], start=1):
                id_, label, image, metadata = rows[int(q_ids[j])]
                hit = Hit(r, id_, float(q_scores[j]), float(q_distances[j]), metadata, image)
                if inliers[q] is not None:
                    hit = replace(hit, inliers=int(inliers[q][j]), verified=bool(inliers[q][j] >= MIN_INLIERS))
                hits.append(hit)
            out.append(hits)
        return out

    def _verify_shortlist(self, query: LocalFeatures, shortlist: np.ndarray, looks: _Looks, subset: Any) -> np.ndarray:
        """Verify a query's shortlist (int ids) into ``looks.inliers``; when none of it verifies,
        the items its descriptors vote for that the shortlist lacks, verified too (returned)."""
        if (self._inliers(query, shortlist, looks.inliers) >= MIN_INLIERS).any():
            return np.zeros(0, np.int64)
        voted = self._voted(query, looks, subset, shortlist)
        self._inliers(query, voted, looks.inliers)
        return voted

    def _voted(self, query: LocalFeatures, looks: _Looks, subset: Any, shortlisted: np.ndarray) -> np.ndarray:
        """The int ids the query's descriptors vote for (``local.DescriptorVote``) that the
        filter allows and the shortlist lacks."""
        if looks.voted is None:
            vote = self._descriptor_vote() if not isinstance(subset, str) else None  # str: a backend's own filter
            looks.voted = vote.top(query) if vote is not None else np.zeros(0, np.int64)
        voted = looks.voted[~np.isin(looks.voted, shortlisted)]
        return voted if subset is None else voted[np.isin(voted, subset)]

    def _descriptor_vote(self) -> DescriptorVote | None:
        """The catalog's local descriptors in one index (``local.DescriptorVote``), made on first
        use and brought up to date after the index changes; None for an index without local
        features, a backend that keeps no int ids here, or one too big for VOTE_MAX_DESCRIPTORS."""
        with self._vote_lock:
            if self._vote is None or self._vote[0] != self.generation:  # (a rebuild drops it: _reload)
                ids = getattr(self._index, "ids", None)
                vote = self._vote[1] if self._vote is not None else None
                current = frozenset(int(i) for i in ids) if self.has_local_features and ids is not None else None
                count = self._items.local_descriptor_count(current) if current is not None else 0
                if current is None or count > VOTE_MAX_DESCRIPTORS:
                    vote = None
                elif vote is None:
                    vote = self._new_vote(current, count)
                elif vote.items != current:
                    vote = vote.changed(self._local_of(current - vote.items), set(vote.items - current))
                self._vote = (self.generation, vote)
            return self._vote[1]

    def _new_vote(self, items: frozenset[int], count: int) -> DescriptorVote:
        """A vote over these items (holding ``count`` descriptors): read from the user cache where
        an earlier process made it for this generation of the index, else made, and cached when
        it is big enough to be slow to make (VOTE_CACHE_MIN). The cache is only a shortcut: a
        file that cannot be read or written is made or left out, never an error."""
        path = self._vote_file() if count >= VOTE_CACHE_MIN else None
        if path is not None and path.is_file():
            try:
                vote = DescriptorVote.load(path, items)
                if len(vote) == count:
                    return vote
            except (RuntimeError, OSError):  # damaged or unreadable: made again below
                pass
        vote = DescriptorVote(self._local_of(items))
        if path is not None:
            try:
                for older in path.parent.glob(path.name.split("-")[0] + "-*.faiss"):  # this index's earlier ones
                    older.unlink(missing_ok=True)
                vote.save(path)
            except (RuntimeError, OSError):
                pass  # no cache to write to: the next process makes it again
        return vote

    def _vote_file(self) -> Path:
        """Where this generation's vote is kept between processes: the user cache, named by the
        index directory and by the manifest's build time, generation and file hashes (so a rebuilt
        or changed index never reads another's vote)."""
        where = hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]
        state = [self.manifest.get("created_at"), self.generation, self.manifest.get("files")]
        what = hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return cache_dir() / "votes" / f"{where}-{what}.faiss"

    def _local_of(self, int_ids) -> dict[int, LocalFeatures]:
        """The stored local features of these items, by int id (those that have them)."""
        stored = self._items.local_features(int_ids)
        return {i: LocalFeatures.from_blobs(*blobs) for i, blobs in stored.items()}

    def _inliers(self, query: LocalFeatures, int_ids: np.ndarray, fitted: dict[int, int] | None = None) -> np.ndarray:
        """Inliers the query shares with each candidate (0 for one without local features).
        ``fitted``: the counts of candidates fitted before (by int id), added to here."""
        fitted = {} if fitted is None else fitted
        new = [int(i) for i in dict.fromkeys(int_ids.tolist()) if int(i) not in fitted]
        stored = self._items.local_features(new)

        def count(int_id: int) -> int:
            blobs = stored.get(int_id)
            return local_inliers(query, LocalFeatures.from_blobs(*blobs)) if blobs is not None else 0

        with one_blas_thread():
            fitted.update(zip(new, self._workers().map(count, new)))
        return np.fromiter((fitted[int(i)] for i in int_ids), dtype=np.int64, count=len(int_ids))

    def best_turn(self, turned: np.ndarray, filter: dict[str, Any] | None = None, margin: float = ORIENT_MARGIN) -> np.ndarray:
        """Which turn to search each query with, given it upright and turned ([n, 4, dim], as
        ``Featurizer.featurize_turned`` makes them, or [n, 4, regions, dim]: each turn's regions)
        -> positions into TURNS; see ``search(orient=...)`` (``orient="auto"`` uses margin 0)."""
        turned = np.asarray(turned, dtype=np.float32)
        if turned.ndim not in (3, 4) or turned.shape[1] != len(TURNS) or turned.shape[-1] != self.dim:
            raise QueryError(f"expected vectors of shape [n, {len(TURNS)}, {self.dim}] or [n, {len(TURNS)}, regions, "
                             f"{self.dim}], got {list(turned.shape)}")
        return self._best_turn(turned, self._subset(filter), margin)

    def _best_turn(self, turned: np.ndarray, subset: np.ndarray | None = None, margin: float = ORIENT_MARGIN) -> np.ndarray:
        """From [n, 4, dim] vectors of each query turned 0/90/180/270 degrees (or [n, 4, regions,
        dim]: a turn scores by its best region), the turn to search with (positions into TURNS).

        A turn replaces the upright query only when its best hit scores ``margin`` higher: with
        ORIENT_MARGIN a turn of an upright photo then almost never wins by chance (measured on
        coil-6view and grocery-iconic, recall@1 fell by at most 0.004), on photos taken sideways it
        usually wins.
        """
        n, turns, dim = turned.shape[0], turned.shape[1], turned.shape[-1]
        if len(self._index) == 0 or (subset is not None and len(subset) == 0):
            return np.zeros(n, np.int64)
        top = self._index.search(turned.reshape(-1, dim), 1, subset=subset)[0][:, 0].reshape(n, turns, -1).max(axis=2)
        best = top.argmax(axis=1)
        return np.where(top[np.arange(n), best] > top[:, 0] + margin, best, 0)

    @staticmethod
    def passing(hits: list[Hit], min_score: float | None) -> list[Hit]:
        """The hits ``min_score`` keeps: those scoring at least it, and every verified one."""
        return hits if min_score is None else [h for h in hits if h.score >= min_score or h.verified]

    @staticmethod
    def unsure(hits: list[Hit]) -> bool:
        """Whether a query's hits call for a second look (``orient="auto"``, ``regions="auto"``):
        none, or the best neither verified nor scoring UNSURE."""
        return not hits or (not hits[0].verified and hits[0].score < UNSURE)

    @staticmethod
    def check_budget(budget_ms: Any, orient: Any, regions: Any) -> None:
        """Raise QueryError unless ``budget_ms`` is None, or a number of milliseconds above 0 given
        with ``orient`` or ``regions`` "auto" (the second looks it limits): a budget that would
        limit nothing is a mistake to be told of, not to be ignored."""
        if budget_ms is None:
            return
        if isinstance(budget_ms, bool) or not isinstance(budget_ms, (int, float, np.integer, np.floating)) \
                or not math.isfinite(budget_ms) or budget_ms <= 0:
            raise QueryError(f"budget_ms must be a number of milliseconds above 0 (or none), got {budget_ms!r}",
                             subject=budget_ms)
        if "auto" not in (orient, regions):
            raise QueryError("budget_ms limits the second looks of orient or regions 'auto'; give one of them "
                             "'auto', or no budget_ms", subject=budget_ms)

    def search_featurized(
        self,
        image: Any,
        vectors: np.ndarray,
        k: int = 5,
        filter: dict[str, Any] | None = None,
        min_score: float | None = None,
        expand: int = 0,
        local: LocalFeatures | None = None,
        orient: bool | str = "auto",
        regions: bool | str = "auto",
        turn: int = 0,
        reading: Callable[[], Any] | None = None,
        compute: Callable[[], Any] | None = None,
        budget_ms: float | None = None,
        started: float | None = None,
        skipped: list[str] | None = None,
    ) -> list[Hit]:
        """search() of one query image for callers that featurize it themselves, second looks
        included: its hits with its ``vectors`` ([dim], or [REGIONS, dim] from
        ``featurize_regions``; turned by ``turn`` degrees, as ``orient=True`` does), and where
        those are ``unsure``, ``orient="auto"``'s best turn, then ``regions="auto"``'s finer grid
        at that turn; the hits of the last look taken. ``local``: the image's query local
        features (``local.extract_query``) to verify with; its descriptor vote is taken once and
        a candidate is fitted once, however many looks find them.

        ``budget_ms``: the query's time budget (a live camera's frame budget): a second look is
        taken only when the time since ``started`` (a ``time.perf_counter()``; default: this call)
        plus what the look is expected to take fits in it: its model runs at the featurizer's
        recent pace (``Featurizer.expected_ms``) and its search at the pace of recent second looks'
        (which verify only candidates no earlier look fitted and reuse the descriptor vote; before
        any, as long as this query's first search). None: every look the hits call for.
        ``skipped``: a list the looks the hits called for but the budget left out are appended to
        ("turn", "grid").

        For a service: ``reading`` (a context manager yielding this object) guards each index
        search, ``compute`` each model run, so that neither is held through the other.
        """
        _check_k(k)
        _check_expand(expand)
        _check_orient(orient)
        _check_regions(regions)
        self.check_budget(budget_ms, orient, regions)
        started = time.perf_counter() if started is None else started
        vectors = _query_vectors(vectors[None], self.dim)[0]
        reading = reading or (lambda: contextlib.nullcontext(self))
        compute = compute or contextlib.nullcontext
        local = local if self.has_local_features else None
        looks = _Looks()  # what verification found, for every look of this query
        left_out = skipped if skipped is not None else []
        searched = time.perf_counter()
        with reading() as vs:
            hits = vs._search_vectors(vectors[None], k, filter, expand, [local], [looks])[0]
        search_ms = 1000.0 * (time.perf_counter() - searched)

        def fits(inputs: int) -> bool:
            """Whether a look of this many model inputs fits in what is left of the budget."""
            if budget_ms is None:
                return True
            spent = 1000.0 * (time.perf_counter() - started)
            searching = search_ms if self._look_search_ms is None else self._look_search_ms
            return spent + self.featurizer.expected_ms(inputs) + searching <= budget_ms

        def look(vectors: np.ndarray) -> list[Hit]:
            """A second look's search, its time folded into the pace ``fits`` expects."""
            searched = time.perf_counter()
            with reading() as vs:
                hits = vs._search_vectors(vectors[None], k, filter, expand, [local], [looks])[0]
            self._look_search_ms = moving_average(self._look_search_ms, 1000.0 * (time.perf_counter() - searched))
            return hits

        if self.unsure(hits) and (orient == "auto" or regions == "auto"):
            image = load_image(image, policy=self.policy, draft_size=self.featurizer.draft_size(regions or True))
            if orient == "auto" and not fits(self.turn_inputs(regions=vectors.ndim == 2)):
                left_out.append("turn")
            elif orient == "auto":
                with compute():
                    turned = self.turned(image, vectors)
                with reading() as vs:
                    best = int(vs.best_turn(turned[None], filter, margin=0.0)[0])
                if best:
                    turn, vectors = TURNS[best], turned[best]
                    hits = look(vectors)
            if regions == "auto" and self.unsure(hits) and not fits(GRID**2):
                left_out.append("grid")
            elif regions == "auto" and self.unsure(hits):
                with compute():
                    grid = self.featurizer.featurize_regions([image], [turn], grid=True)[0]
                hits = look(np.concatenate([vectors.reshape(-1, self.dim), grid]))
        return self.passing(hits, min_score)

    def turn_inputs(self, regions: bool) -> int:
        """Model inputs ``turned`` runs: three turns of the whole picture (with its mirror image
        under flip averaging), or with ``regions`` three turns of the REGIONS."""
        if regions:
            return 3 * REGIONS
        return 2 * len(TURNS) if self.spec.tta == "flip" else len(TURNS)

    def turned(self, image: Any, upright: np.ndarray) -> np.ndarray:
        """An image's query vectors upright (``upright``: [dim], or [REGIONS, dim] from
        ``featurize_regions``) and turned by 90, 180 and 270 degrees, the same kind: [4, ...]."""
        if upright.ndim == 2:  # decoded (or fetched) once for the three turns
            image = load_image(image, policy=self.policy, draft_size=self.featurizer.draft_size(regions=True))
            rest = self.featurizer.featurize_regions([image] * 3, list(TURNS[1:]))
        else:
            rest = self.featurizer.featurize_turned([image])[0, 1:]
        return np.concatenate([upright[None], rest])

    def _expanded(
        self, vectors: np.ndarray, n: int, subset: np.ndarray | None = None, exclude: np.ndarray | None = None
    ) -> np.ndarray:
        """Alpha query expansion: each query plus its ``n`` nearest items, weighted by score ** QE_ALPHA.

        (Radenovic et al., "Fine-tuning CNN image retrieval with no human annotation", 2018.)
        ``exclude`` gives, per query, an int id that must not take part (the query's own item).
        """
        if self.metric != "cosine":
            raise QueryError(f"query expansion needs a cosine index; {self.path} uses {self.metric}")
        q = prepare(vectors, "cosine")
        scores, _, ids = self._index.search(q, n + (exclude is not None), subset=subset)
        use = ids >= 0
        if exclude is not None:
            use &= ids != np.asarray(exclude)[:, None]
        use &= np.cumsum(use, axis=1) <= n
        weights = np.where(use, np.clip(scores, 0.0, 1.0) ** QE_ALPHA, 0.0).astype(np.float32)
        neighbours = self._index.vectors_of(np.where(ids >= 0, ids, self._index.ids[0] if len(self._index) else 0))
        return prepare(q + np.einsum("qn,qnd->qd", weights, neighbours), "cosine")

    def classify(self, queries: Any, k: int = 5, label: str = "label"):
        """Majority ``label`` among each query's k neighbours (ties: the larger summed score)."""
        results = self.search(queries, k=k)
        single = isinstance(results, SearchResult)
        out = [vote(r, label) for r in ([results] if single else results)]
        return out[0] if single else out

    def _as_list(self, queries: Any) -> tuple[list[Any], bool]:
        if _is_single(queries, self.dim):
            return [queries], True
        if isinstance(queries, np.ndarray) and queries.ndim == 2:  # a batch of vectors
            return list(queries), False
        if isinstance(queries, (list, tuple)):
            if not queries:
                raise QueryError("no queries given")
            return list(queries), False
        raise QueryError(f"cannot search with a {type(queries).__name__}; give an image, a vector, or a list of them")

    def _vectors(self, sources: list[Any], turned: bool = False, turns: list[int] | None = None) -> np.ndarray:
        """Query vectors [n, dim]; with ``turned``, [n, 4, dim]: each image upright and turned;
        with ``turns`` (degrees, one per source), [n, REGIONS, dim]: the regions of each image
        turned so (a vector query is the same in every slot)."""
        shape = (len(sources), len(TURNS) if turned else REGIONS, self.dim) if turned or turns is not None \
            else (len(sources), self.dim)
        out = np.zeros(shape, np.float32)
        image_positions = []
        for pos, source in enumerate(sources):
            if _is_vector(source):
                out[pos] = check_vectors(source, self.dim, f"query {pos + 1}")[0]
            else:
                image_positions.append(pos)
        if image_positions:
            images = [sources[p] for p in image_positions]
            if turned:
                out[image_positions] = self.featurizer.featurize_turned(images)
            elif turns is not None:
                out[image_positions] = self.featurizer.featurize_regions(images, [turns[p] for p in image_positions])
            else:
                out[image_positions] = self.featurizer.featurize(images, strict=True).vectors
        return out

    @staticmethod
    def _names(sources: list[Any]) -> list[str]:
        return ["<vector>" if _is_vector(s) else describe(s) for s in sources]

    # --- changing ------------------------------------------------------------------------

    def add(
        self,
        catalog: str | os.PathLike | Sequence[Item],
        *,
        strict: bool = False,
        progress: bool | ProgressFactory | None = None,
    ) -> Report:
        """Add a catalog's items without rebuilding; ids already in the index are an error.

        Nothing on disk changes until every new item is featurized; an error leaves the index as it was.
        """
        start = time.perf_counter()
        build = self.manifest.get("build_id")  # the build whose model featurizes them: checked under the lock
        items = _items(catalog)
        present = self._items.int_ids(it.id for it in items)
        if present:
            first = next(it for it in items if it.id in present)
            raise CatalogError(
                f"id {first.id!r} ({first.row}) is already in the index; remove it first or give it another id"
                + (f" ({len(present)} such ids)" if len(present) > 1 else ""),
                subject=first.id,
            )
        vectors, kept, report = _featurize_items(self.featurizer, items, strict, _progress(progress))
        if items and not kept:  # as a build of them would be: an error, not "indexed 0 items"
            raise _none_read(catalog, items, report)
        if kept:
            _check_finite(vectors, self.spec.name)
            vectors = prepare(vectors, self.metric)
            # Extracted before taking the writers' lock, like the vectors: by position until the int ids are known.
            local = _local_blobs(kept, np.arange(len(kept)), self.policy, None) if self.has_local_features else None
            with self._store.lock():
                self._reload()  # another process may have changed it since we opened it
                if self.manifest.get("build_id") != build:  # rebuilt in its place, perhaps with another model
                    raise StoreError(f"{self.path}: the index was rebuilt in its place while these items were "
                                     "featurized; nothing was added: add them again", subject=str(self.path))
                present = self._items.int_ids(it.id for it in kept)
                if present:
                    raise CatalogError(f"id {next(iter(present))!r} was added to the index by another process")
                first = int(self.manifest.get("next_int_id", self._items.max_int_id() + 1))
                int_ids = np.arange(first, first + len(kept), dtype=np.int64)
                if local is not None:
                    local = {int(int_ids[position]): blobs for position, blobs in local.items()}
                vindex = self._index.copy()  # an IVF index keeps its centroids: `reindex` learns them again
                vindex.add(vectors, int_ids, metadata=[it.metadata for it in kept] if vindex.filters_metadata else None)
                manifest = dict(self.manifest, next_int_id=int(int_ids[-1]) + 1)
                self._store.commit(manifest, vindex.vectors, vindex.ids, vindex.write_faiss,
                                   added=list(zip(int_ids.tolist(), kept)), removed=[], local=local)
                vindex.committed()
                self._reload()
        report.indexed = len(kept)
        report.seconds = time.perf_counter() - start
        return report

    def remove(self, ids: Sequence[str] | str) -> int:
        """Remove items by id; an unknown id is an error and nothing is removed."""
        ids = [ids] if isinstance(ids, str) else [str(i) for i in ids]
        if not ids:
            raise QueryError("no ids given to remove")
        with self._store.lock():
            self._reload()
            found = self._items.int_ids(ids)
            missing = [i for i in ids if i not in found]
            if missing:
                raise CatalogError(
                    f"{self.path}: no item with id {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + "; nothing removed",
                    subject=missing[0],
                )
            int_ids = np.fromiter(found.values(), dtype=np.int64)
            vindex = self._index.copy()
            removed = vindex.remove(int_ids)
            self._store.commit(self.manifest, vindex.vectors, vindex.ids, vindex.write_faiss, added=[], removed=int_ids.tolist())
            vindex.committed()
            self._reload()
        return removed

    def keep_upload(self, data: bytes, suffix: str) -> str:
        """Store an image sent to the service in the index directory (``uploads/``, named by its
        content) and return its absolute path, for the item about to be added with it."""
        return str(self._store.keep_upload(data, suffix))

    def sweep_uploads(self) -> int:
        """Delete the stored uploads no item uses any more (after a grace time for adds in
        flight); how many."""
        return self._store.sweep_uploads()

    def reindex(self) -> dict[str, Any]:
        """Plan and train the index again from the stored vectors (the kind kept, its parameters
        chosen for today's size), as a new generation. Returns {"before", "after"} index specs."""
        with self._store.lock():
            self._reload()
            before = self._index.spec
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", IndexWarning)
                metadata = None
                if self._index.filters_metadata:
                    rows = self._items.rows(self._index.ids)
                    metadata = [rows[int(i)][3] for i in self._index.ids]
                vindex = create_index(self._index.asked_kind, self.metric, self._index.vectors, self._index.ids,
                                      whiten=int(before.params.get("whiten", 0)), max_memory=before.params.get("max_memory"),
                                      backend=before.backend, metadata=metadata)
            manifest = dict(self.manifest, index=vindex.spec.to_dict())
            try:
                self._store.commit(manifest, vindex.vectors, vindex.ids, vindex.write_faiss, added=[], removed=[])
            except BaseException:
                if before.backend:
                    vindex.discard()
                raise
            vindex.committed()
            self._reload()
        return {"before": before.to_dict(), "after": vindex.spec.to_dict(), "warnings": [str(w.message) for w in caught]}

    # --- measuring -----------------------------------------------------------------------

    def evaluate(
        self,
        queries: str | os.PathLike | Sequence[Item] | None = None,
        *,
        label: str = "label",
        ks: Sequence[int] = (1, 5, 10),
        leave_one_out: bool = False,
        expand: int = 0,
        orient: bool | str = False,
        verify: bool | None = None,
        regions: bool | str = False,
        budget_ms: float | None = None,
        progress: bool | ProgressFactory | None = None,
    ) -> dict[str, Any]:
        """Recall@k, precision@1 and mAP (full ranking) of a query catalog against this index.

        A hit is a neighbour whose metadata ``label`` equals the query's. A query that is itself
        in the index (same id and image) is left out of its own ranking (leave-one-out), and its
        stored vector is used instead of featurizing it again. ``leave_one_out=True`` (and no
        ``queries``) makes every item of the index a query against the others. ``expand``,
        ``orient``, ``verify``, ``regions`` and ``budget_ms`` are search's (``orient`` and ``regions`` apply to
        the queries that are featurized; a query that is an item of the index verifies with its
        stored local features). With either "auto" (the camera's choice) each featurized query is
        ranked by ``search`` itself, second looks included, one at a time.
        """
        _check_expand(expand)
        _check_orient(orient)
        _check_regions(regions)
        self.check_budget(budget_ms, orient, regions)
        ks = sorted({int(k) for k in ks})
        if not ks or ks[0] < 1:
            raise QueryError(f"k values must be >= 1, got {list(ks)}")
        if leave_one_out == (queries is not None):
            raise QueryError("give a query catalog, or leave_one_out=True to query the index with its own items; not both")
        if len(self) == 0:
            raise QueryError(f"{self.path}: the index holds no items, so there is nothing to evaluate against",
                             subject=str(self.path))
        if leave_one_out:
            items = [Item(id=id_, image=image or "", label=lab, metadata=meta, row=f"item {id_!r}")
                     for _, id_, lab, image, meta in self._items.all_rows()]
        else:
            items = _items(queries)
        if any(it.metadata.get(label) is None for it in items):
            missing = next(it for it in items if it.metadata.get(label) is None)
            raise CatalogError(f"{missing.row}: query {missing.id!r} has no {label!r}", subject=missing.id)
        start = time.perf_counter()
        rows = self._items.all_rows()
        int_to_label = {r[0]: _label_key(r[4].get(label)) for r in rows}
        stored = {r[1]: (r[0], r[3]) for r in rows}  # id -> (int_id, image)
        position = {int(i): p for p, i in enumerate(self._index.ids)}

        self_ids = np.full(len(items), -1, dtype=np.int64)
        vectors = np.zeros((len(items), REGIONS, self.dim) if regions else (len(items), self.dim), np.float32)
        to_featurize = []
        for q, it in enumerate(items):
            hit = stored.get(it.id)
            if hit is not None and hit[1] == it.image:
                self_ids[q] = hit[0]
                vectors[q] = self._index.vectors[position[hit[0]]]  # in every region's slot
            else:
                to_featurize.append(q)
        skipped: list[tuple[str, str]] = []  # (query id, why it could not be used)
        keep = np.ones(len(items), bool)
        n_all = len(self._index)
        searched: dict[int, np.ndarray] = {}  # query -> its whole ranking (int ids), from search()
        if to_featurize and (orient or regions):  # one query at a time: turned, and its regions
            camera = orient == "auto" or regions == "auto"  # ranked by search() itself, second looks included
            int_of = {id_: int_id for id_, (int_id, _) in stored.items()}
            factory = _progress(progress)
            bar = factory(len(to_featurize)) if factory else None
            for q in to_featurize:
                try:
                    if camera:
                        hits = self.search(items[q].image, k=max(1, n_all), expand=expand, orient=orient,
                                           verify=verify, regions=regions, budget_ms=budget_ms).hits
                        searched[q] = np.full(n_all, -1, np.int64)  # -1: not reached (an inverted file's unprobed lists)
                        searched[q][:len(hits)] = [int_of[h.id] for h in hits]
                    else:
                        turn = 0
                        if orient:
                            turned = self.featurizer.featurize_turned([items[q].image])
                            turn = int(self._best_turn(turned)[0])
                            vectors[q] = turned[0, turn]
                        if regions:
                            vectors[q] = self.featurizer.featurize_regions([items[q].image], [TURNS[turn]])[0]
                except ImageError as exc:
                    keep[q] = False
                    skipped.append((items[q].id, _reason(exc)))
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
        elif to_featurize:
            factory = _progress(progress)
            bar = factory(len(to_featurize)) if factory else None
            try:
                result = self.featurizer.featurize([items[q].image for q in to_featurize], progress=bar.update if bar else None)
            finally:
                if bar is not None:
                    bar.close()
            ok = [to_featurize[i] for i in result.ok]
            vectors[ok] = result.vectors
            for i, exc in result.errors:
                keep[to_featurize[i]] = False
                skipped.append((items[to_featurize[i]].id, _reason(exc)))

        ranked_here = keep.copy()
        ranked_here[list(searched)] = False
        local = self._query_local_features(items, self_ids, ranked_here) if self._verifying(verify) else None
        gallery_labels = np.array([int_to_label.get(int(i)) for i in self._index.ids], dtype=object)
        label_counts: dict[Any, int] = {}
        for value in gallery_labels:
            label_counts[value] = label_counts.get(value, 0) + 1

        def scored(chunk: np.ndarray, ranked: np.ndarray):
            """per_query's figures of these queries, from their rankings (int ids) [len(chunk), n]."""
            ranked_labels = np.vectorize(int_to_label.get, otypes=[object])(ranked) if ranked.size else ranked
            query_labels = np.array([_label_key(items[q].metadata[label]) for q in chunk], dtype=object)
            relevant = ranked_labels == query_labels[:, None]
            is_self = ranked == self_ids[chunk][:, None]
            if is_self.any():  # move each query's own item to the end of its ranking, as not relevant
                order = np.argsort(is_self, axis=1, kind="stable")
                relevant = np.take_along_axis(relevant, order, axis=1)
                relevant[is_self.any(axis=1), -1] = False
                positives = np.array([label_counts.get(_label_key(items[q].metadata[label]), 0) - (self_ids[q] >= 0) for q in chunk])
            else:
                positives = np.array([label_counts.get(_label_key(items[q].metadata[label]), 0) for q in chunk])
            return per_query(relevant, positives, ks)

        chunks = []
        if searched:
            chunks.append(scored(np.array(list(searched)), np.stack(list(searched.values()))))
        qs = np.flatnonzero(keep)
        here = np.flatnonzero(ranked_here)
        for s in range(0, len(here), 256):
            chunk = here[s:s + 256]
            queries = vectors[chunk].reshape(-1, self.dim)
            if expand:
                queries = self._expanded(queries, expand, exclude=np.repeat(self_ids[chunk], REGIONS if regions else 1))
            found = self._index.search(queries, n_all)
            ranked = _best_region(*found, REGIONS)[2] if regions else found[2]
            if local is not None:  # geometric verification reorders each query's shortlist, as search's
                for row, q in zip(ranked, chunk):
                    if local[q] is not None:
                        head, rest, looks = row[:VERIFY_SHORTLIST], row[VERIFY_SHORTLIST:], _Looks()
                        voted = self._verify_shortlist(local[q], head, looks, None)
                        head, rest = np.concatenate([head, voted]), rest[~np.isin(rest, voted)]
                        row[:] = np.concatenate([head[_verified_first(looks.counts(head))], rest])
            chunks.append(scored(chunk, ranked))
        seconds = time.perf_counter() - start
        out: dict[str, Any] = combine(chunks, ks)
        out["queries"] = int(keep.sum())
        out["queries_per_s"] = round(len(qs) / seconds, 2) if seconds > 0 else None
        out["skipped"] = len(skipped)
        out["left_out_self"] = int((self_ids[keep] >= 0).sum())
        # queries whose label no other item of the index has: recall counts them as misses, mAP leaves them out
        out["no_relevant_items"] = sum(int((~c["has_positives"]).sum()) for c in chunks)
        out["skipped_items"] = [{"id": i, "reason": r} for i, r in skipped]
        return out

    def _query_local_features(self, items: list[Item], self_ids: np.ndarray, keep: np.ndarray) -> list[LocalFeatures | None]:
        """Each evaluate query's local features: stored ones for an item of the index, else extracted."""
        stored = self._items.local_features(self_ids[self_ids >= 0])
        todo = [q for q in range(len(items)) if keep[q] and int(self_ids[q]) not in stored]
        blobs = _local_blobs([items[q] for q in todo], np.arange(len(todo)), self.policy, None, extract_query)
        out: list[LocalFeatures | None] = [None] * len(items)
        for q in range(len(items)):
            if int(self_ids[q]) in stored:
                out[q] = LocalFeatures.from_blobs(*stored[int(self_ids[q])])
        for n, q in enumerate(todo):
            if n in blobs:
                out[q] = LocalFeatures.from_blobs(*blobs[n])
        return out

    def info(self) -> dict[str, Any]:
        """What the index is: model, metric, index kind and why, dimension, count, size on disk."""
        m = self.manifest
        return {
            "path": str(self.path),
            "model": m["model"]["name"],
            "weights_sha256": m["model"].get("weights", {}).get("sha256"),
            "dim": self.dim,
            "metric": self.metric,
            "index": m["index"]["kind"],
            "index_params": m["index"].get("params", {}),
            "chosen_because": m["index"].get("chosen_because", ""),
            "backend": m["index"].get("backend") or {"name": "faiss"},
            "memory_bytes": self._index.memory_bytes,  # the index structure's (FAISS's, or Milvus's), estimated
            "recall_at_10": m["index"].get("measured", {}).get("recall_at_10"),  # measured when kind auto chose it
            "reindex_advised": self._index.retrain_advice(),
            "count": int(m["count"]),
            "generation": int(m["generation"]),
            "size_bytes": self._store.disk_size(),
            "preprocessing": m["model"].get("preprocessing", {}),
            "features": self.spec.features(),
            "runtime": m["model"].get("runtime", "onnxruntime"),  # what built it; queries choose their own
            "precision": m["model"].get("precision", "fp32"),
            "local_features": m.get("local_features"),
            "finetuned": m["model"].get("finetuned"),  # a model directory's base, head and what it learned from
            "created_at": m.get("created_at"),
            "updated_at": m.get("updated_at"),
            "format_version": m["format_version"],
        }


# --- helpers ------------------------------------------------------------------------------


def _name(catalog: Any) -> str:
    return os.fspath(catalog) if isinstance(catalog, (str, os.PathLike)) else "<items>"


def _items(catalog: Any) -> list[Item]:
    if isinstance(catalog, (str, os.PathLike)):
        return read_catalog(catalog)
    items = list(catalog)
    if not items or not all(isinstance(it, Item) for it in items):
        raise CatalogError("a catalog must be a path or a non-empty list of Item")
    items = [_as_catalog_row(it, n) for n, it in enumerate(items, start=1)]
    check_unique(items)
    return items


def _as_catalog_row(item: Item, n: int) -> Item:
    """An Item made in Python as a catalog file's row is: a non-empty text id, a label in its
    metadata (where hits show it and filters, classify and evaluate look: ``label`` goes there
    when the metadata has none; the metadata's own is what counts), and no NaN or infinity in its
    metadata (None, as a JSONL catalog reads them: JSON has neither)."""
    where = item.row or f"item {n}"
    if not isinstance(item.id, str) or not item.id.strip():
        raise CatalogError(f"{where}: an item's id must be a non-empty string, got {item.id!r}", subject=item.id)
    metadata = _finite_json(dict(item.metadata or {}))
    if item.label is not None:
        metadata.setdefault("label", item.label)
    return replace(item, label=metadata.get("label", item.label), metadata=metadata, row=where)


def _finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _backend_entry(backend: str, milvus_uri: str | None, collection: str | None, path: Any,
                   kind: str, whiten: int) -> dict[str, Any]:
    """The IndexSpec.backend of a build ({} for FAISS), checked (and Milvus reached) before featurizing."""
    if backend in (None, "faiss"):
        if milvus_uri or collection:
            raise IndexError_("--milvus-uri and --collection go with --backend milvus", subject=milvus_uri or collection)
        return {}
    if backend != "milvus":
        index_class({"name": backend})  # the error names the backends there are
    if not milvus_uri:
        raise IndexError_("--backend milvus needs --milvus-uri: a Milvus Lite file (e.g. catalog.db) or a server "
                          "address (e.g. http://localhost:19530)")
    from .backends.milvus import backend_entry, check_offered, client, default_collection, has_collection

    check_offered(kind, whiten)
    entry = backend_entry(milvus_uri, collection or default_collection(path))
    client(entry["uri"])  # unreachable, or held by another process: said now, not after featurizing
    # A collection of that name that is not this directory's index (rebuilt with --force) belongs to
    # another index (two directories of one name share the default name): replacing it would
    # leave that one searching this one's vectors with its own metadata.
    try:
        current = IndexDir(path).manifest()["index"].get("backend") or {}
    except StoreError:
        current = {}
    ours = (current.get("uri"), current.get("collection")) == (entry["uri"], entry["collection"])
    if not ours and has_collection(entry["uri"], entry["collection"]):
        raise IndexError_(f"collection {entry['collection']} in {entry['uri']} already holds another index (of another "
                          f"directory, or of one deleted since); name another with --collection, or drop that one "
                          "first", subject=entry["collection"])
    return entry


def _none_read(catalog: Any, items: list[Item], report: Report) -> CatalogError:
    """The error of a catalog none of whose images could be read, with the first one's reason."""
    first = f"; the first, {report.skipped[0][0]!r}: {report.skipped[0][1]}" if report.skipped else ""
    return CatalogError(f"{_name(catalog)}: none of its {len(items)} images could be read{first}", subject=_name(catalog))


def _check_finite(vectors: np.ndarray, model: str) -> None:
    """ModelError unless every feature is a finite number: NaN weights (a damaged or badly trained
    model) give NaN features, which no search could use; nothing is written then."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        raise ModelError(f"{model}: the model gave NaN or infinite features for {int(bad.sum())} of {len(vectors)} "
                         "images (damaged or badly trained weights?); nothing was written", subject=model)


def _check_target(path: Path, force: bool) -> None:
    """Fail before featurizing if the build could not be written."""
    if path.exists() and path.is_dir() and any(path.iterdir()):
        if not (path / "lookalike.json").exists():
            raise StoreError(f"{path}: already exists and is a folder that is not empty", subject=str(path))
        if not force:
            raise StoreError(f"{path}: already exists and is an index; pass --force to replace it", subject=str(path))
    elif path.exists() and not path.is_dir():
        raise StoreError(f"{path}: exists and is a file", subject=str(path))


def _featurize_items(featurizer: Featurizer, items: list[Item], strict: bool, progress: ProgressFactory | None):
    bar = progress(len(items)) if progress else None
    try:
        result = featurizer.featurize([it.image for it in items], strict=strict, progress=bar.update if bar else None)
    finally:
        if bar is not None:
            bar.close()
    report = Report(skipped=[(items[i].id, _reason(err)) for i, err in result.errors])
    return result.vectors, [items[i] for i in result.ok], report


def _featurize_in_shards(featurizer: Featurizer, items: list[Item], strict: bool, progress: ProgressFactory | None,
                         checkpoint: BuildCheckpoint, ray: dict[str, Any] | None = None):
    """Featurize ``items`` SHARD_ITEMS at a time, saving each shard; shards a killed build of the
    same catalog and options saved are read back instead (``Report.resumed`` counts their items).

    ``ray`` (the options of ``distributed.featurize_on_ray``, e.g. its ``address``): the missing
    shards' images are featurized there instead, and each shard is saved once its last image is in.
    """
    shards = [(lo, min(len(items), lo + SHARD_ITEMS)) for lo in range(0, len(items), SHARD_ITEMS)]
    have = set(checkpoint.done())
    bar = progress(len(items)) if progress else None
    done: dict[int, tuple[np.ndarray, list[int], list[tuple[int, str]]]] = {}
    resumed = 0
    try:
        for number in sorted(have):
            saved = checkpoint.load(number, file_stamps(items[slice(*shards[number])])) if number < len(shards) else None
            if saved is not None:
                done[number] = saved
                lo, hi = shards[number]
                resumed += hi - lo
                if bar is not None:
                    bar.update(hi - lo)
        missing = [number for number in range(len(shards)) if number not in done]
        featurized = _shards_on_ray if ray is not None else _shards_here
        for number, shard_vectors, shard_ok, errors in featurized(featurizer, items, shards, missing, bar, ray):
            if errors and strict:
                raise errors[0][1]
            shard_skipped = [(i, _reason(err)) for i, err in errors]
            # The files as they are now, just after their reading (one changed in between is
            # featurized again by a resume only if it changes again: a window of a moment)
            checkpoint.save(number, shard_vectors, shard_ok, shard_skipped, file_stamps(items[slice(*shards[number])]))
            done[number] = (shard_vectors, shard_ok, shard_skipped)
    finally:
        if bar is not None:
            bar.close()
    ordered = [done[number] for number in range(len(shards))]
    ok = [i for _, shard_ok, _ in ordered for i in shard_ok]
    report = Report(skipped=[(items[i].id, reason) for _, _, skipped in ordered for i, reason in skipped], resumed=resumed)
    vectors = [v for v, _, _ in ordered]
    out = np.concatenate(vectors) if vectors else np.zeros((0, featurizer.dim), np.float32)
    return out, [items[i] for i in ok], report


def _shards_here(featurizer: Featurizer, items: list[Item], shards, missing: list[int], bar, ray=None):
    """(shard number, vectors, catalog positions of its rows, [(position, ImageError)]) of each missing shard, in this process."""
    for number in missing:
        lo, hi = shards[number]
        result = featurizer.featurize([it.image for it in items[lo:hi]], progress=bar.update if bar else None)
        yield number, result.vectors, [lo + i for i in result.ok], [(lo + i, err) for i, err in result.errors]


def _shards_on_ray(featurizer: Featurizer, items: list[Item], shards, missing: list[int], bar, ray: dict[str, Any]):
    """As ``_shards_here``, from Ray (``distributed``): blocks come back in any order; a shard is
    yielded once all its images are in."""
    from .distributed import featurize_on_ray

    positions = [i for number in missing for i in range(*shards[number])]
    left = {number: shards[number][1] - shards[number][0] for number in missing}
    got: dict[int, dict[int, Any]] = {number: {} for number in missing}  # shard -> position -> vector or error
    for block_positions, block_vectors, errors in featurize_on_ray(
        [items[i].image for i in positions], positions, spec=featurizer.spec, weights=featurizer.weights,
        runtime=featurizer.runtime, precision=featurizer.precision, device=featurizer.device, policy=featurizer.policy,
        batch_size=featurizer.batch_size, model_file=featurizer.model_file, progress=bar.update if bar else None, **ray,
    ):
        for position, value in [*zip(block_positions.tolist(), block_vectors), *errors]:
            number = position // SHARD_ITEMS
            got[number][position] = value
            left[number] -= 1
            if left[number] == 0:
                found = got.pop(number)
                ok = sorted(p for p, v in found.items() if isinstance(v, np.ndarray))
                errs = sorted(((p, v) for p, v in found.items() if not isinstance(v, np.ndarray)), key=lambda e: e[0])
                dim = featurizer.dim
                vectors = np.stack([found[p] for p in ok]) if ok else np.zeros((0, dim), np.float32)
                yield number, vectors, ok, errs
    if got:
        raise ClusterError(f"Ray returned no result for {sum(left[n] for n in got)} images", subject=ray.get("address"))


def _local_blobs(
    items: list[Item], int_ids: np.ndarray, policy: ImagePolicy, progress: ProgressFactory | None,
    extract: Callable[[Any], LocalFeatures] = extract_local,
) -> dict[int, tuple[bytes, bytes]]:
    """int id -> local feature blobs of each item (``extract``: a catalog picture's, or
    ``extract_query`` for query photos), extracted on every core (OpenCV releases the GIL).

    An image that cannot be read now (it was a moment ago) just gets no local features.
    """
    def one(item: Item):
        try:
            return extract(load_image(item.image, policy=policy)).to_blobs()
        except ImageError:
            return None

    bar = progress(len(items)) if progress else None
    out = {}
    try:
        with ThreadPoolExecutor(max_workers=cpu_count(), thread_name_prefix="lookalike-local") as pool:
            for int_id, blobs in zip(int_ids.tolist(), pool.map(one, items)):
                if blobs is not None:
                    out[int(int_id)] = blobs
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return out


def _model_entry(spec: ModelSpec, weights: Weights, featurizer: Featurizer, model_file: Path | None,
                 calibrated: int) -> dict[str, Any]:
    entry = {
        "name": spec.name,
        "arch": spec.arch,
        "weights": weights.to_dict(),
        "dim": featurizer.dim,
        "preprocessing": spec.preprocessing(),
        "features": spec.features(),
        "runtime": featurizer.runtime,
        "precision": featurizer.precision,
    }
    if spec.head_dim:  # a model directory: enough to open the index without it, and where it came from
        config = read_model_config(spec.name)
        entry["finetuned"] = {"base": config["base"], "head_dim": spec.head_dim, "label": config.get("label"),
                              "catalog": config.get("catalog", {}).get("name"),
                              "val_recall_at_1": config.get("metrics", {}).get("val_recall_at_1")}
    if model_file is not None:
        entry["model_file"] = {"name": model_file.name, "sha256": file_sha256(model_file),
                               "size": model_file.stat().st_size, "calibration_images": calibrated}
    return entry


def _query_vectors(vectors: Any, dim: int) -> np.ndarray:
    """Query vectors [n, dim] or [n, regions, dim], checked (QueryError) as float32."""
    if isinstance(vectors, np.ndarray) and vectors.ndim == 3:
        n, regions = vectors.shape[:2]
        return check_vectors(vectors.reshape(n * regions, -1), dim, "query vectors").reshape(n, regions, dim)
    return check_vectors(vectors, dim, "query vectors")


class _Closed:
    """What ``VisualSearch.close`` let go of: any use of it says so."""

    def __init__(self, path: Path):
        self._path = path

    def __getattr__(self, name: str):
        raise StoreError(f"{self._path}: this VisualSearch was closed; open the index again to use it",
                         subject=str(self._path))


@dataclass
class _Looks:
    """What verifying one query found, kept across its looks (``search_featurized``)."""

    inliers: dict[int, int] = field(default_factory=dict)  # candidate int id -> inliers
    voted: np.ndarray | None = None  # int ids its descriptors vote for, most votes first

    def counts(self, int_ids: np.ndarray) -> np.ndarray:
        """The inliers of these candidates, all fitted already: int64, in their order."""
        return np.fromiter((self.inliers[int(i)] for i in int_ids), np.int64, len(int_ids))


def _best_region(scores: np.ndarray, distances: np.ndarray, int_ids: np.ndarray, regions: int):
    """Hits of each query's ``regions`` consecutive rows merged: each item once, at its best
    region's score, most similar first; [n, k] like one search's (k: the rows' width)."""
    n, k = len(int_ids) // regions, int_ids.shape[1]
    scores, distances, int_ids = (a.reshape(n, regions * k) for a in (scores, distances, int_ids))
    out = [np.empty((n, k), a.dtype) for a in (scores, distances, int_ids)]
    for q in range(n):
        order = np.argsort(-scores[q], kind="stable")
        _, first = np.unique(int_ids[q, order], return_index=True)
        pick = order[np.sort(first)][:k]  # every region has k distinct items, so there are k at least
        for a, b in zip(out, (scores, distances, int_ids)):
            a[q] = b[q, pick]
    return tuple(out)


def _verified_first(inliers: np.ndarray) -> np.ndarray:
    """The order of a shortlist after verification: verified candidates first, most inliers
    first; the others after them, in their own (global) order."""
    verified = inliers >= MIN_INLIERS
    return np.lexsort((np.arange(len(inliers)), -np.where(verified, inliers, 0), ~verified))


def _plain(value: Any) -> Any:
    """numpy's scalars (np.int64, np.float32, np.bool_ ...) as the Python number they hold."""
    return value.item() if isinstance(value, np.generic) else value


def _label_key(value: Any) -> Any:
    """A label as evaluate compares it: a number as its text (2011 and "2011" are one label, as a
    filter finds either with the other: a CSV's labels are text, a JSONL's may be numbers)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    return value


def _spellings(value: Any) -> list[Any]:
    """A filter value and its other spelling, a number and its text (30 and "30", 1.5 and "1.5"):
    a CSV catalog's metadata are text, a JSONL one's may be numbers, and a filter typed on the
    command line is text, so either must find the other."""
    if isinstance(value, bool) or value is None:
        return [value]
    if isinstance(value, (int, float)):
        return [value, str(value)] if math.isfinite(value) else [value]
    try:
        number: int | float = int(value) if value.lstrip("-").isdigit() else float(value)
    except ValueError:
        return [value]
    return [value, number] if math.isfinite(number) and str(number) == value else [value]


def _check_expand(expand: Any) -> None:
    if isinstance(expand, bool) or not isinstance(expand, (int, np.integer)) or not 0 <= expand <= MAX_EXPAND:
        raise QueryError(f"expand must be a whole number from 0 to {MAX_EXPAND}, got {expand!r}", subject=expand)


def _check_orient(orient: Any) -> None:
    if not any(orient is o or (isinstance(o, str) and orient == o) for o in ORIENTS):
        raise QueryError(f"orient must be true, false or 'auto', got {orient!r}", subject=orient)


def _check_regions(regions: Any) -> None:
    if not any(regions is r or (isinstance(r, str) and regions == r) for r in REGION_MODES):
        raise QueryError(f"regions must be true, false or 'auto', got {regions!r}", subject=regions)




def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise QueryError(f"k must be a whole number >= 1, got {k!r}", subject=k)


def _is_vector(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return x.ndim == 1
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in x)
    return False


def _is_single(x: Any, dim: int) -> bool:
    if isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        return True
    if isinstance(x, np.ndarray):
        return x.ndim == 1 or x.ndim == 3 or (x.ndim == 2 and not (np.issubdtype(x.dtype, np.floating) and x.shape[1] == dim))
    return _is_vector(x)


def vote(result: SearchResult, label: str = "label") -> dict[str, Any]:
    """Majority ``label`` among a result's hits, ties broken by the larger summed score; with the votes.
    A hit without the label has no vote; a number and its text are one label (as ``evaluate``
    counts them; True is not 1)."""
    votes: dict[Any, int] = {}
    sums: dict[Any, float] = {}
    for h in result.hits:
        value = h.metadata.get(label)
        if value is None or value == "":
            continue
        value = _label_key(value)
        votes[value] = votes.get(value, 0) + 1
        sums[value] = sums.get(value, 0.0) + h.score
    winner = max(votes, key=lambda v: (votes[v], sums[v])) if votes else None
    return {
        "query": result.query,
        "label": winner,
        "votes": {str(v): {"count": votes[v], "score": round(sums[v], 6)} for v in sorted(votes, key=lambda v: (-votes[v], -sums[v]))},
        "hits": [h.to_dict() for h in result.hits],
    }
