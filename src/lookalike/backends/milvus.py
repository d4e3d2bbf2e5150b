"""The index in Milvus: a collection searched by Milvus Lite (a local .db file) or a Milvus server.

The collection holds, per item, its int id (the primary key), its prepared vector and its
metadata (a JSON field), so a metadata filter runs inside Milvus as a filter expression
(``filter_expression``) rather than as a list of ids sent with every query. Everything else about
an item (its string id, image, the metadata hits show) stays in the index directory's
items.sqlite, the one record the manifest commits; the directory also keeps the vectors and ids,
from which a lost or damaged collection is rebuilt (``lookalike doctor``) and which exact search
over the whole catalog, recall measurement and ``evaluate`` read.

Kinds map to Milvus index types: flat -> FLAT (exact), hnsw -> HNSW, ivf -> IVF_FLAT,
ivfsq8 -> IVF_SQ8; ivfpq (PCA, then exact re-ranking, both lookalike's own) and whitening are not
offered. Metrics: cosine and ip -> IP over the prepared (for cosine, L2-normalised) vectors, l2 ->
L2 (squared, like FAISS), so scores and distances follow ``index`` exactly.

Keeping the collection and the index directory in step:
- a build (and ``reindex``) fills a staging collection, NAME__building; once the manifest is
  committed the staging collection takes the name (``committed``);
- ``add`` upserts the new items before the manifest is committed; every search asks only for
  int ids below the largest one its generation holds, so items of an add not yet (or never)
  committed are invisible, and an add tried again overwrites them;
- ``remove`` deletes from the collection once the manifest is committed;
- opening counts the collection's items below that bound: a count that differs from the
  directory's is a StoreError that points to ``lookalike doctor``, which rebuilds the collection.

Milvus Lite is embedded: one process at a time may open its .db (it holds a lock). Several
processes (service workers, a CLI beside a service) need a Milvus server; its credentials come
from the environment (MILVUS_TOKEN: "user:password" or an API key), never from the manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import BackendError, IndexError_, QueryError
from ..index import VectorIndex, check_k, check_vectors, no_hits, plan_index, prepare
from ..types import IndexSpec, fits_int64

INDEX_TYPES = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT", "ivfsq8": "IVF_SQ8"}
METRIC_TYPES = {"cosine": "IP", "ip": "IP", "l2": "L2"}
MAX_K = 16384  # Milvus's largest topk
INSERT_ROWS = 1000  # rows per insert call (1,000 x 1280 floats: 5 MB, well under gRPC's limits)
STAGING = "__building"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_clients: dict[tuple[int, str], Any] = {}
_loaded_collections: set[tuple[int, str, str]] = set()  # (pid, uri, collection) this process loaded


def is_server(uri: str) -> bool:
    """Whether ``uri`` is a Milvus server's address (else: a Milvus Lite database file)."""
    return "://" in uri


def resolve_uri(uri: str) -> str:
    """A server address as given; a Milvus Lite file as an absolute path ending in .db."""
    uri = str(uri).strip()
    if not uri:
        raise IndexError_("--milvus-uri is empty: give a Milvus Lite file (e.g. catalog.db) or a server "
                          "address (e.g. http://localhost:19530)")
    if is_server(uri):
        return uri
    if not uri.endswith(".db"):
        raise IndexError_(f"{uri}: a Milvus Lite database is a path ending in .db (or give a server address, "
                          "e.g. http://localhost:19530)", subject=uri)
    return str(Path(uri).expanduser().resolve())


def default_collection(index_path: str | os.PathLike) -> str:
    """The collection named after the index directory: lookalike_<its name, letters, digits and _>."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", Path(index_path).resolve().name)
    return f"lookalike_{name}"[:200]


def check_collection(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith(STAGING):
        raise IndexError_(f"collection name {name!r}: Milvus wants a letter or _ first, then letters, digits "
                          f"and _ (at most 255), and lookalike keeps names ending in {STAGING} for builds",
                          subject=name)
    return name


def backend_entry(uri: str, collection: str) -> dict[str, Any]:
    """The IndexSpec.backend (and manifest) entry of a Milvus index."""
    return {"name": "milvus", "uri": resolve_uri(uri), "collection": check_collection(collection)}


@contextlib.contextmanager
def _milvus(uri: str, what: str) -> Iterator[None]:
    """Milvus's own exceptions -> BackendError naming the database and what was being done."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as exc:
        message = getattr(exc, "message", None) or str(exc)
        if "lock" in message.lower() or "locked" in message.lower():
            message += "; Milvus Lite lets one process at a time open its file: use a Milvus server for several"
        raise BackendError(f"milvus {uri}: cannot {what} ({message.splitlines()[0]})", subject=uri) from exc


def client(uri: str):
    """One MilvusClient per database and process (Milvus Lite: the embedded server of that file)."""
    key = (os.getpid(), uri)
    if key not in _clients:
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # not a log line on every fork of a process that has used it
        try:
            from pymilvus import MilvusClient
        except ImportError as exc:
            raise IndexError_("the milvus backend needs pymilvus and milvus-lite: pip install 'lookalike[milvus]'") from exc
        if not is_server(uri):
            _check_lite_free(uri)
        from pymilvus.exceptions import MilvusException

        with _milvus(uri, "connect"):  # MilvusException, in its own words
            try:
                # a server's credentials ("user:password" or an API key) never go into the manifest
                token = os.environ.get("MILVUS_TOKEN", "") if is_server(uri) else ""
                _clients[key] = MilvusClient(uri=uri, token=token)
            except MilvusException:
                raise
            except Exception as exc:  # a malformed address, or a refusal pymilvus did not wrap
                raise BackendError(f"milvus {uri}: cannot connect ({type(exc).__name__}: {exc})", subject=uri) from exc
    return _clients[key]


def has_collection(uri: str, name: str) -> bool:
    """Whether the database at ``uri`` holds a collection of that name."""
    with _milvus(uri, f"look for collection {name}"):
        return bool(client(uri).has_collection(name))


def release(uri: str) -> None:
    """Close this process's client of ``uri``; a Milvus Lite file is then free for other processes
    (a later use here connects again)."""
    found = _clients.pop((os.getpid(), uri), None)
    _loaded_collections.difference_update({key for key in _loaded_collections if key[:2] == (os.getpid(), uri)})
    if found is None:
        return
    with contextlib.suppress(Exception):
        found.close()
    if not is_server(uri):
        with contextlib.suppress(Exception):
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(uri)


def _check_lite_free(path: str) -> None:
    """A Milvus Lite file another process holds fails here with a message, not deep in pymilvus."""
    lock = Path(path) / "LOCK"
    if not lock.exists():
        return
    import fcntl

    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        raise BackendError(f"milvus {path}: another process has this Milvus Lite database open (a running "
                         "`lookalike serve`?); Milvus Lite lets one process at a time open it: stop that process, "
                         "or keep the index in a Milvus server", subject=path) from None
    finally:
        os.close(fd)


def _literal(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and not fits_int64(value):
        value = float(value)  # as the stored metadata has it (``_json_value``)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not np.isfinite(value):
            raise QueryError(f"filter {key!r}: {value!r} is not a number the milvus backend can compare", subject=key)
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise QueryError(f"filter {key!r}: the milvus backend compares strings, numbers and booleans, "
                     f"not {type(value).__name__}", subject=key)


def filter_expression(where: dict[str, Any]) -> str:
    """A metadata filter (field -> value, a list meaning any of its values, as ``ItemTable.matching``)
    as a Milvus filter expression over the JSON field ``metadata``."""
    clauses = []
    for key, value in where.items():
        field = "metadata[" + json.dumps(str(key), ensure_ascii=False) + "]"
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        values = [v for v in values if v is not None]  # SQL's IN (NULL) matches nothing: so here
        if not values:
            return "int_id < 0"
        clauses.append("(" + " or ".join(f"{field} == {_literal(v, str(key))}" for v in values) + ")")
    return " and ".join(clauses)


def _json_value(value: Any) -> Any:
    """Metadata as Milvus's JSON field takes it: whole numbers past 64 bits become floats (as
    SQLite's json_extract reads them), anything JSON has no form for becomes its text."""
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if fits_int64(value) else float(value)
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    return json.loads(json.dumps(value, default=str))


def _rows(vectors: np.ndarray, ids: np.ndarray, metadata: list[dict] | None) -> list[dict]:
    meta = metadata if metadata is not None else [{}] * len(ids)
    return [{"int_id": int(i), "vector": v, "metadata": _json_value(m)} for i, v, m in zip(ids, vectors, meta)]


class MilvusIndex(VectorIndex):
    """A Milvus collection plus the vectors and int ids it holds (the index directory's)."""

    filters_metadata = True
    write_faiss = None  # nothing of the index is in the directory's generation files

    def __init__(self, spec: IndexSpec, dim: int, vectors: np.ndarray, ids: np.ndarray,
                 collection: str | None = None, metadata: list[dict] | None = None):
        """Over ``collection`` as it stands, or (None) a new staging collection filled with the vectors."""
        self.spec, self.dim = spec, dim
        self.mapped, self._sorted, self.index = False, None, None
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, dim)
        self.ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(self.vectors) != len(self.ids):
            raise IndexError_(f"{len(self.vectors)} vectors but {len(self.ids)} ids")
        check_offered(spec.kind, spec.params.get("whiten", 0))  # a planned spec: never kind auto
        self.uri, self.collection = spec.backend["uri"], spec.backend["collection"]
        self.one_process = not is_server(self.uri)  # Milvus Lite: one process at a time
        client(self.uri)  # reached now: a wrong address fails here
        self._pending_removal: list[int] = []
        self._top = int(self.ids.max()) if len(self.ids) else -1  # the largest int id of this generation
        if collection is None:
            self._live, self._staged = self.collection + STAGING, True
            self._fill(metadata)
        else:
            self._live, self._staged = collection, False

    @property
    def _client(self):
        return client(self.uri)  # looked up each time: ``close`` (of any view) lets it go

    def close(self) -> None:
        release(self.uri)

    def _loaded(self):
        """The client, with the collection searched loaded (a Milvus Lite file opened again starts released)."""
        key = (os.getpid(), self.uri, self._live)
        if key not in _loaded_collections:
            self._client.load_collection(self._live)
            _loaded_collections.add(key)
        return self._client

    @classmethod
    def create(cls, kind: str, metric: str, vectors: np.ndarray, ids: np.ndarray, whiten: int = 0,
               max_memory: "int | str | None" = None, backend: dict[str, Any] | None = None,
               metadata: list[dict] | None = None) -> "MilvusIndex":
        """Plan as FAISS would (``index.plan_index``) and fill a staging collection; ``committed``
        gives it its name."""
        check_offered(kind, whiten)
        vectors = np.asarray(vectors, dtype=np.float32)
        spec = replace(plan_index(kind, metric, len(vectors), vectors.shape[1], 0, max_memory), backend=dict(backend))
        built = cls(spec, vectors.shape[1], vectors, ids, metadata=metadata)
        if kind == "auto":
            built.tune()
        return built

    @classmethod
    def load(cls, spec: IndexSpec, dim: int, vectors: np.ndarray, ids: np.ndarray, faiss_path: str | None = None):
        """Open the collection -> (index, whether it holds exactly this generation's items)."""
        index = cls(spec, dim, vectors, ids, collection=spec.backend["collection"])
        return index, index._intact()

    def _intact(self) -> bool:
        with _milvus(self.uri, f"open collection {self._live}"):
            if not self._client.has_collection(self._live):
                return False
            total = self._count(bounded=False)
            # more than ours: an add that was never committed is fine (its ids are past ours), so count
            # again within the bound (a filtered count reads every row: Milvus Lite takes 17 s at 100k)
            return total == len(self.ids) or (total > len(self.ids) and self._count(bounded=True) == len(self.ids))

    def _count(self, bounded: bool) -> int:
        found = self._loaded().query(self._live, filter=self._bounded(None) if bounded else "", output_fields=["count(*)"])
        return int(found[0]["count(*)"])

    def problem(self) -> str:
        """What is wrong with the collection, for ``doctor`` (call when ``load`` said it is not intact)."""
        with _milvus(self.uri, f"open collection {self._live}"):
            if not self._client.has_collection(self._live):
                return f"collection {self._live} is not in milvus {self.uri}"
            found = self._count(bounded=True)
        return f"collection {self._live} in milvus {self.uri} holds {found} items, the index {len(self.ids)}"

    @staticmethod
    def expression(where: dict[str, Any]) -> str:
        """A metadata filter as this backend's search takes it (``filter_expression``)."""
        return filter_expression(where)

    def copy(self) -> "MilvusIndex":
        """Another view of the same collection, to change: its changes reach Milvus as the class says."""
        spec = replace(self.spec, params=dict(self.spec.params), measured=dict(self.spec.measured))
        twin = MilvusIndex(spec, self.dim, self.vectors, self.ids, collection=self._live)
        twin._staged = self._staged
        return twin

    # --- building and changing -------------------------------------------------------------

    def _index_params(self):
        p = self.spec.params
        build = {"hnsw": {"M": p.get("M"), "efConstruction": p.get("ef_construction")},
                 "ivf": {"nlist": p.get("nlist")}, "ivfsq8": {"nlist": p.get("nlist")}}.get(self.spec.kind, {})
        params = self._client.prepare_index_params()
        params.add_index("vector", index_type=INDEX_TYPES[self.spec.kind],
                         metric_type=METRIC_TYPES[self.spec.metric], params=build)
        return params

    def _fill(self, metadata: list[dict] | None) -> None:
        """(Re)create the staging collection and put every vector (and its metadata) in it."""
        from pymilvus import DataType, MilvusClient

        if metadata is not None and len(metadata) != len(self.ids):
            raise IndexError_(f"{len(self.ids)} vectors but metadata for {len(metadata)}")
        with _milvus(self.uri, f"create collection {self._live}"):
            if self._client.has_collection(self._live):  # left by a build that did not finish
                self._client.drop_collection(self._live)
            _loaded_collections.discard((os.getpid(), self.uri, self._live))
            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("int_id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            schema.add_field("metadata", DataType.JSON)
            self._client.create_collection(self._live, schema=schema, index_params=self._index_params(),
                                           consistency_level="Strong")
        self._insert(self.vectors, self.ids, metadata, upsert=False)

    def _insert(self, vectors: np.ndarray, ids: np.ndarray, metadata: list[dict] | None, upsert: bool) -> None:
        write = self._client.upsert if upsert else self._client.insert
        with _milvus(self.uri, f"write to collection {self._live}"):
            for start in range(0, len(ids), INSERT_ROWS):
                end = start + INSERT_ROWS
                write(self._live, _rows(vectors[start:end], ids[start:end],
                                        None if metadata is None else metadata[start:end]))
            self._client.flush(self._live)  # sealed and indexed: searches of growing segments are slow
            self._loaded()

    def add(self, vectors: np.ndarray, ids: np.ndarray, metadata: list[dict] | None = None) -> None:
        """Upsert into the collection now (invisible to searches until this generation is opened)."""
        vectors = check_vectors(vectors, self.dim, "added vectors")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if metadata is not None and len(metadata) != len(ids):
            raise IndexError_(f"{len(ids)} vectors but metadata for {len(metadata)}")
        self._insert(vectors, ids, metadata, upsert=True)
        self.vectors = np.concatenate([self.vectors, vectors])
        self.ids = np.concatenate([self.ids, ids])
        self._sorted = None
        self._top = max(self._top, int(ids.max()))

    def remove(self, ids: np.ndarray) -> int:
        """Remove from this view now, from the collection once committed."""
        ids = np.asarray(ids, dtype=np.int64)
        keep = ~np.isin(self.ids, ids)
        removed = int((~keep).sum())
        if removed:
            self._pending_removal.extend(int(i) for i in self.ids[~keep])
            self.vectors = np.ascontiguousarray(self.vectors[keep])
            self.ids = np.ascontiguousarray(self.ids[keep])
            self._sorted = None  # _top stays: a removed id is never given again, and is deleted on commit
        return removed

    def committed(self) -> None:
        """The store committed this generation: delete what it removed; a staging collection takes the name."""
        with _milvus(self.uri, f"update collection {self.collection}"):
            if self._pending_removal:
                for start in range(0, len(self._pending_removal), INSERT_ROWS):
                    self._client.delete(self._live, ids=self._pending_removal[start:start + INSERT_ROWS])
                self._pending_removal = []
            if self._staged:
                if self._client.has_collection(self.collection):
                    self._client.drop_collection(self.collection)
                self._client.rename_collection(self._live, self.collection)
                _loaded_collections.difference_update({key for key in _loaded_collections if key[1] == self.uri})
                self._live, self._staged = self.collection, False

    def discard(self) -> None:
        """Drop a staging collection that will not be committed."""
        if self._staged:
            with contextlib.suppress(BackendError), _milvus(self.uri, f"drop collection {self._live}"):
                self._client.drop_collection(self._live)

    # --- searching -----------------------------------------------------------------------

    def _bounded(self, where: str | None) -> str:
        """Only int ids of this generation (see the module's docstring), and ``where``."""
        bound = f"int_id <= {self._top}"
        return f"{bound} and ({where})" if where else bound

    def search(self, queries: np.ndarray, k: int, subset: "str | np.ndarray | None" = None):
        """(scores, distances, int ids) as ``VectorIndex.search``; ``subset`` is a filter expression
        (``filter_expression``) or an array of int ids."""
        check_k(k)
        queries = prepare(check_vectors(queries, self.dim, "query vector"), self.spec.metric)
        if isinstance(subset, np.ndarray):
            subset = f"int_id in [{', '.join(str(int(i)) for i in subset)}]" if len(subset) else "int_id < 0"
        kk = min(int(k), len(self.ids))
        if kk == 0:
            return no_hits(len(queries))
        if kk > MAX_K:
            if subset is None and kk == len(self.ids):  # the whole catalog ranked: from the stored vectors
                values, ids = self._exact(queries, kk, None)
                return self.scores(values), self.distances(values), ids
            raise QueryError(f"k is at most {MAX_K} with the milvus backend (or the whole catalog, unfiltered), "
                             f"got {k}", subject=k)
        values, ids = self._drop_missing(*self._approximate(queries, kk, subset))
        return self.scores(values), self.distances(values), ids

    def _approximate(self, queries: np.ndarray, k: int, subset: "str | None"):
        p = self.spec.params
        params = {"ef": max(int(p["ef_search"]), k)} if self.spec.kind == "hnsw" else (
            {"nprobe": int(p["nprobe"])} if "nprobe" in p else {})
        with _milvus(self.uri, f"search collection {self._live}"):
            found = self._loaded().search(
                self._live, data=np.ascontiguousarray(queries, dtype=np.float32), limit=k, filter=self._bounded(subset),
                output_fields=["int_id"], search_params={"metric_type": METRIC_TYPES[self.spec.metric], "params": params},
            )
        worst = np.inf if self.spec.metric == "l2" else -np.inf
        values = np.full((len(queries), k), worst, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        for q, hits in enumerate(found):
            n = min(k, len(hits))
            values[q, :n] = [h["distance"] for h in hits[:n]]
            ids[q, :n] = [h["int_id"] for h in hits[:n]]
        return values, ids


def check_offered(kind: str, whiten: int = 0) -> None:
    """IndexError_ for what this backend does not offer: ivfpq (PCA and exact re-ranking are
    lookalike's own) and whitening (FAISS's own transform). Kind ``auto`` chooses among the rest."""
    if kind not in (*INDEX_TYPES, "auto"):
        raise IndexError_(f"index kind {kind} is not offered with the milvus backend (its PCA and exact "
                          f"re-ranking are lookalike's own); use one of {', '.join(INDEX_TYPES)} (or a memory budget)",
                          subject=kind)
    if whiten:
        raise IndexError_("whitening is not offered with the milvus backend (it is FAISS's own transform)", subject=whiten)
