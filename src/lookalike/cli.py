"""The `lookalike` command line: build, search, add, remove, info, doctor, classify, evaluate, finetune, models, serve, camera.

Human-readable output by default, ``--json`` for machines. Expected failures print
``error: <message>`` to stderr and exit 2; anything unexpected exits 1 (traceback with --debug).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Any

from . import __version__
from .backends import BACKENDS
from .engine import CAMERA_BUDGET_MS, VisualSearch
from .errors import LookalikeError
from .finetune import HEAD_DIM, VAL_FRACTION, VIEWS
from .index import KINDS, METRICS
from .models import DEFAULT_FEATURES, DEFAULT_MODEL, POOLINGS, REGISTRY, TTAS, list_models
from .runtimes import PRECISIONS, RUNTIMES


def _progress_factory(args):
    if args.quiet or not sys.stderr.isatty() and not args.progress:
        return None
    from tqdm import tqdm

    def factory(total: int, what: str = "featurizing"):
        return tqdm(total=total, unit="img", desc=what, file=sys.stderr, mininterval=0.5, dynamic_ncols=True,
                    leave=what == "featurizing")

    return factory


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _fmt_meta(metadata: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    parts = [f"{k}={v}" for k, v in metadata.items() if k not in skip and v not in (None, "")]
    return "  ".join(parts)


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _print_report(report, args) -> None:
    if args.json:
        return
    if report.warnings:
        for w in report.warnings:
            print(f"warning: {w}", file=sys.stderr)
    print(report.summary())
    for item_id, reason in report.skipped[:50]:
        print(f"  skipped {item_id}: {reason}")
    if len(report.skipped) > 50:
        print(f"  ... and {len(report.skipped) - 50} more")


# --- commands -----------------------------------------------------------------------------


def cmd_build(args) -> int:
    vs = VisualSearch.build(
        args.catalog, args.output, model=args.model, metric=args.metric, index=args.index, max_memory=args.max_memory,
        batch_size=args.batch_size, weights=args.weights, device=args.device, strict=args.strict,
        force=args.force, progress=_progress_factory(args),
        crop_pct=args.crop_pct, pooling=args.pooling, tta=args.tta, whiten=args.whiten,
        local_features=args.local_features, runtime=args.runtime, precision=args.precision, resume=args.resume,
        backend=args.backend, milvus_uri=args.milvus_uri, collection=args.collection, ray=args.ray,
    )
    report = vs.build_report
    if args.json:
        _print_json({**report.to_dict(), "index": vs.info()})
    else:
        _print_report(report, args)
        info = vs.info()
        print(f"index written to {args.output} ({info['model']}, {info['metric']}, {info['index']}, "
              f"{info['count']} items, {_human_size(info['size_bytes'])})")
    return 0


def cmd_search(args) -> int:
    vs = VisualSearch.open(args.index_dir, device=args.device, runtime=args.runtime)
    filt = _parse_filter(args.filter)
    orient, regions = _looks(args)
    results = vs.search(list(args.queries), k=args.k, filter=filt, expand=args.expand, orient=orient, regions=regions,
                        verify=False if args.no_verify else None, budget_ms=_budget(args))
    if args.json:
        _print_json([r.to_dict() | {"query": q} for r, q in zip(results, args.queries)])
        return 0
    for query, result in zip(args.queries, results):
        print(query)
        if not result.hits:
            print("  (no match)")
        for h in result.hits:
            title = h.metadata.get("title")
            head = f"  {h.rank:>2}. {h.id}  score {h.score:.4f}"
            if h.verified:
                head += f"  verified ({h.inliers} inliers)"
            if title:
                head += f"  {title}"
            print(head)
            rest = _fmt_meta(h.metadata, skip=("title",))
            if rest:
                print(f"      {rest}")
        if result.skipped:
            print(f"  (second looks left out for the {args.budget_ms} ms budget: {', '.join(result.skipped)})")
    return 0


def cmd_classify(args) -> int:
    vs = VisualSearch.open(args.index_dir, device=args.device, runtime=args.runtime)
    results = vs.classify(list(args.queries), k=args.k, label=args.label)
    if args.json:
        _print_json([r | {"query": q} for r, q in zip(results, args.queries)])
        return 0
    for query, r in zip(args.queries, results):
        if r["label"] is None:
            why = f"its nearest items have no {args.label}" if r["hits"] else "the index holds no items"
            print(f"{query}: (no {args.label}: {why})")
            continue
        votes = ", ".join(f"{lab} {v['count']} ({v['score']:.3f})" for lab, v in r["votes"].items())
        print(f"{query}: {r['label']}    votes: {votes}")
    return 0


def cmd_add(args) -> int:
    vs = VisualSearch.open(args.index_dir, device=args.device, runtime=args.runtime)
    report = vs.add(args.catalog, strict=args.strict, progress=_progress_factory(args))
    if args.json:
        _print_json({**report.to_dict(), "count": len(vs)})
    else:
        _print_report(report, args)
        print(f"{args.index_dir} now holds {len(vs)} items")
    return 0


def cmd_remove(args) -> int:
    vs = VisualSearch.open(args.index_dir)
    removed = vs.remove(args.ids)
    if args.json:
        _print_json({"removed": removed, "count": len(vs)})
    else:
        print(f"removed {removed} items; {args.index_dir} now holds {len(vs)} items")
    return 0


def cmd_info(args) -> int:
    vs = VisualSearch.open(args.index_dir)
    info = vs.info()
    if args.verify:
        info["problems"] = vs._store.verify()
    if args.json:
        _print_json(info)
        return 0 if not info.get("problems") else 2
    rows = [
        ("path", info["path"]),
        ("model", f"{info['model']} (weights sha256 {str(info['weights_sha256'])[:12]})"),
        *([("fine-tuned", _describe_finetuned(info["finetuned"]))] if info["finetuned"] else []),
        ("dimension", info["dim"]),
        ("metric", info["metric"]),
        ("features", f"{info['features']['pooling']} pooling, crop {info['preprocessing'].get('crop_pct')}, "
                     f"flip {'on' if info['features']['tta'] == 'flip' else 'off'}"),
        ("model runs", f"{info['precision']} (built with {info['runtime']})"),
        ("local features", _describe_local(info["local_features"])),
        ("index", f"{info['index']} {info['index_params'] or ''}".strip()),
        ("chosen because", info["chosen_because"]),
        *([("backend", f"milvus {info['backend']['uri']}, collection {info['backend']['collection']}")]
          if info["backend"]["name"] == "milvus" else []),
        ("memory", f"{_human_size(info['memory_bytes'])} (the {'FAISS' if info['backend']['name'] == 'faiss' else 'Milvus'} "
                   "structure, estimated)"),
        *([("recall@10", f"{info['recall_at_10']:.3f} against exact search (measured at build)")]
          if info["recall_at_10"] is not None else []),
        *([("reindex", info["reindex_advised"])] if info["reindex_advised"] else []),
        ("items", info["count"]),
        ("size on disk", _human_size(info["size_bytes"])),
        ("generation", info["generation"]),
        ("created", info["created_at"]),
        ("updated", info["updated_at"]),
    ]
    for key, value in rows:
        print(f"{key + ':':<16}{value}")
    if args.verify:
        print(f"{'verify:':<16}" + ("ok" if not info["problems"] else "; ".join(info["problems"])))
        return 0 if not info["problems"] else 2
    return 0


def _describe_local(entry: dict | None) -> str:
    if not entry:
        return "none (searches are not verified geometrically; build with --local-features)"
    return f"{entry['kind']}, up to {entry['max_points']} per image at {entry['size']} px: searches verify their best candidates"


def _describe_finetuned(entry: dict[str, Any]) -> str:
    recall = entry.get("val_recall_at_1")
    return (f"from {entry['base']} on field {entry.get('label')} of {entry.get('catalog')}, {entry['head_dim']}-d head"
            + (f", validation recall@1 {recall:.4f}" if isinstance(recall, (int, float)) else ""))


def cmd_reindex(args) -> int:
    vs = VisualSearch.open(args.index_dir)
    result = vs.reindex()
    if args.json:
        _print_json({**result, "index": vs.info()})
        return 0
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"reindexed {args.index_dir} ({len(vs)} items): {result['before']['kind']} "
          f"{result['before']['params'] or ''} -> {result['after']['kind']} {result['after']['params'] or ''}".rstrip())
    print(f"chosen because: {result['after']['chosen_because']}")
    return 0


def cmd_doctor(args) -> int:
    report = VisualSearch.doctor(args.index_dir, repair=not args.check_only)
    if args.json:
        _print_json(report)
    else:
        for line in report["repaired"]:
            print(f"repaired: {line}")
        for p in report["problems"]:
            hint = " (doctor can rebuild it: run without --check-only)" if p["fixable"] and args.check_only else ""
            print(f"problem: {p['file']}: {p['problem']}{hint}")
        if report["ok"]:
            print(f"{args.index_dir}: every file checks out" + (" after the repair" if report["repaired"] else ""))
        else:
            print(f"{args.index_dir}: damaged beyond what doctor repairs; rebuild it with `lookalike build`", file=sys.stderr)
    return 0 if report["ok"] else 2


def cmd_evaluate(args) -> int:
    vs = VisualSearch.open(args.index_dir, device=args.device, runtime=args.runtime)
    try:
        ks = [int(k) for k in str(args.k).split(",") if k.strip()]
    except ValueError:
        raise LookalikeError(f"-k must be a comma-separated list of whole numbers, got {args.k!r}") from None
    if (args.queries is None) == (not args.leave_one_out):  # the API's rule, in the command's words
        raise LookalikeError("give a query catalog, or --leave-one-out to query the index with its own items; not both")
    orient, regions = _looks(args)
    result = vs.evaluate(args.queries, label=args.label, ks=ks, leave_one_out=args.leave_one_out,
                         expand=args.expand, orient=orient, verify=False if args.no_verify else None,
                         regions=regions, budget_ms=_budget(args), progress=_progress_factory(args))
    if args.json:
        _print_json(result)
        return 0
    width = max(len(key) for key in result) + 2
    for key, value in result.items():
        if key == "skipped_items":
            continue
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key + ':':<{width}}{text}")
    for skipped in result["skipped_items"][:20]:
        print(f"  skipped {skipped['id']}: {skipped['reason']}")
    if len(result["skipped_items"]) > 20:
        print(f"  ... and {len(result['skipped_items']) - 20} more")
    if result["no_relevant_items"]:
        print(f"note: {result['no_relevant_items']} queries have a {args.label} no other item of the index has: "
              "recall counts them as misses, mAP leaves them out")
    return 0


def cmd_finetune(args) -> int:
    bars = _progress_factory(args)  # one bar for caching the views, then one per epoch
    say = None if args.json or args.quiet else print
    report = VisualSearch.finetune(
        args.catalogs, args.output, label=args.label, model=args.model, epochs=args.epochs, device=args.device,
        dim=args.dim, views=args.views, backgrounds=args.backgrounds, val_fraction=args.val_fraction, seed=args.seed,
        force=args.force, say=say, progress=bars,
    )
    if args.json:
        _print_json(report.to_dict())
        return 0
    for skipped in report.skipped[:20]:
        print(f"  not learned from {skipped['id']}: {skipped['reason']}")
    if len(report.skipped) > 20:
        print(f"  ... and {len(report.skipped) - 20} more")
    print(f"model written to {report.model_dir}: validation recall@1 {report.val_recall_at_1:.4f} at epoch "
          f"{report.best_epoch} (before: {report.val_recall_at_1_before:.4f}), {report.train_items} training items, "
          f"{report.labels} labels, {report.seconds:.0f} s; use it with `lookalike build CATALOG -o INDEX "
          f"--model {report.model_dir}`")
    return 0


def cmd_models(args) -> int:
    if args.json:
        _print_json({name: spec.to_dict() for name, spec in sorted(REGISTRY.items())})
        return 0
    for name in list_models():
        spec = REGISTRY.get(name)
        default = " (default)" if name == DEFAULT_MODEL else ""
        desc = spec.description if spec else "any timm model, e.g. timm:convnext_tiny (weights via --weights or hub)"
        print(f"{name:<22}{desc}{default}")
    print(f"{'MODEL_DIR':<22}a model directory written by `lookalike finetune`")
    return 0


def cmd_serve(args) -> int:
    try:
        from .server.app import ServerSettings, serve
    except ImportError as exc:
        raise LookalikeError(f"the service needs its extra ({exc.name} is missing): pip install 'lookalike[serve]'") from None

    api_key = _api_key(args)
    if args.protect_reads and not api_key:
        raise LookalikeError("--protect-reads needs an API key: give --api-key-file PATH or set LOOKALIKE_API_KEY")
    settings = ServerSettings(
        index_dir=args.index_dir, k=args.k, max_upload_bytes=args.max_upload_mb * 1024 * 1024,
        max_pixels=args.max_pixels, allow_urls=args.allow_urls, device=args.device, runtime=args.runtime, api_key=api_key,
        protect_reads=args.protect_reads, cors_origins=tuple(args.cors_origin or ()), max_queue=args.max_queue,
        upload_memory_bytes=(args.upload_memory_mb or 0) * 1024 * 1024, body_timeout_s=float(args.body_timeout),
    )
    serve(settings, host=args.host, port=args.port, workers=args.workers, quiet=args.quiet)
    return 0


def _api_key(args) -> str | None:
    """The write routes' key: from --api-key-file, else $LOOKALIKE_API_KEY, else none (writes off)."""
    if args.api_key_file:
        try:
            key = open(args.api_key_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise LookalikeError(f"{args.api_key_file}: cannot read the API key file ({exc.strerror or exc})") from None
        if len(key) < 16:
            raise LookalikeError(f"{args.api_key_file}: the API key must be at least 16 characters")
        return key
    key = os.environ.get("LOOKALIKE_API_KEY", "").strip()
    if key and len(key) < 16:
        raise LookalikeError("LOOKALIKE_API_KEY must be at least 16 characters")
    return key or None


def cmd_camera(args) -> int:
    from .camera import run_camera

    orient, regions = MODES[args.orient], MODES[args.regions]
    budget = args.budget_ms
    if budget is not None and "auto" not in (orient, regions):  # as search's --budget-ms without --camera
        raise LookalikeError("--budget-ms limits the second looks of --orient auto or --regions auto; "
                             "leave it out, or make one of them auto")
    if budget is None:
        budget = CAMERA_BUDGET_MS if "auto" in (orient, regions) else 0
    vs = VisualSearch.open(args.index_dir, device=args.device, runtime=args.runtime)
    source: int | str = int(args.source) if args.source.isdigit() else args.source
    return run_camera(
        vs, source=source, every_ms=args.every_ms, k=args.k, headless=args.headless,
        max_queries=args.max_queries, out=sys.stdout, orient=orient, regions=regions, budget_ms=budget or None,
    )


def _looks(args) -> tuple[bool | str, bool | str]:
    """search's and evaluate's (orient, regions): --camera's ("auto", "auto"), else --orient and --regions."""
    return ("auto", "auto") if args.camera else (args.orient, args.regions)


def _budget(args) -> float | None:
    """search's and evaluate's --budget-ms: a photo's time budget, for its --camera second looks."""
    if args.budget_ms is not None and not args.camera:
        raise LookalikeError("--budget-ms limits the second looks of --camera; add --camera or leave it out")
    return args.budget_ms


def _parse_filter(pairs: list[str] | None) -> dict[str, Any] | None:
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LookalikeError(f"--filter expects FIELD=VALUE, got {pair!r}")
        out.setdefault(key, []).append(value)
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}


# --- parser -------------------------------------------------------------------------------


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _non_negative_int(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _port(text: str) -> int:
    value = _whole_number(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


EXPAND_HELP = ("query expansion: search again with the query plus its N nearest items (default 0: off; "
               "2 is a good start; helps when the catalog holds several pictures of a kind)")


REGIONS_HELP = ("also search with regions of each query photo (its corners and centre, each 0.6 of the short side) "
                "and score each item by its best region: finds an item that fills only part of a camera's frame; "
                "six model runs without the flip, about 3x a query's featurizing time")
ORIENT_HELP = ("also try each query photo turned by 90, 180 and 270 degrees (taken with the camera on its side) "
               "and keep the turn that matches clearly better; about 4x the featurizing time")


CAMERA_HELP = ("search as the camera does, for phone photos: the regions, and for a photo whose best hit is neither "
               "verified nor scores well, its best turn and then a finer grid of smaller squares (--orient and "
               "--regions 'auto' in the API)")
BUDGET_HELP = ("with --camera: each photo's time budget in ms; its second looks (turned, finer grid) are taken only "
               "when they are expected to fit in it (default: no limit; `camera` has one)")
MODES = {"auto": "auto", "always": True, "never": False}  # camera's --orient and --regions

NO_VERIFY_HELP = ("do not verify the best candidates geometrically (an index built with --local-features "
                  "does by default)")


def _non_negative_int(text: str) -> int:
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own usage errors exit 2 too, in our format
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON for machines")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    common.add_argument("--progress", action="store_true", help="show the progress bar even when stderr is not a terminal")
    common.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    common.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs (default cpu)")
    common.add_argument("--runtime", default="auto", choices=RUNTIMES, help="what runs the model on the CPU (default auto: "
                        "the fastest here, measured once per model and CPU and remembered in the user cache)")

    parser = _Parser(prog="lookalike", description="Visual search: find the catalog items that look like a picture.")
    parser.add_argument("--version", action="version", version=f"lookalike {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("build", parents=[common], help="featurize a catalog into a new index directory")
    p.add_argument("catalog", help="a folder of images, or a .csv/.jsonl/.parquet manifest, or a 'title, url' .txt")
    p.add_argument("-o", "--output", required=True, help="the index directory to write")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL}; see `lookalike models`)")
    p.add_argument("--weights", help="a local PyTorch state dict for the model")
    p.add_argument("--metric", default="cosine", choices=METRICS, help="similarity metric (default cosine)")
    p.add_argument("--index", choices=KINDS, help="FAISS index kind (default flat: exact search; or let "
                   "--max-memory choose)")
    p.add_argument("--max-memory", metavar="SIZE", help="choose the index kind from the catalog size and this budget "
                   "for it (e.g. 2GB): exact up to 50,000 items, then HNSW or IVF-Flat while the vectors fit, then "
                   "IVF-PQ with exact re-ranking; search parameters are tuned to recall@10 >= 0.95 on held-aside items "
                   "and `info` shows the recall measured")
    p.add_argument("--backend", choices=BACKENDS, default="faiss", help="where the index lives: faiss (embedded, "
                   "in the index directory; the default) or milvus (a collection of --milvus-uri); `open`, `search`, "
                   "`add`, `remove` and `serve` then use it")
    p.add_argument("--milvus-uri", metavar="URI", help="a Milvus Lite database file (a path ending in .db: embedded, "
                   "one process at a time) or a Milvus server's address (e.g. http://localhost:19530)")
    p.add_argument("--collection", metavar="NAME", help="the Milvus collection (default lookalike_<the output "
                   "directory's name>); a build replaces it")
    p.add_argument("--ray", nargs="?", const=True, metavar="ADDRESS", help="featurize on Ray: decoding in Ray Data "
                   "tasks, the model in an actor pool (one actor per CPU or GPU); without ADDRESS a local Ray is started "
                   "for the build, with one (e.g. ray://head:10001, or auto) the build joins that cluster")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="images per model batch (default 32)")
    p.add_argument("--strict", action="store_true", help="an unreadable image is an error instead of a skip")
    p.add_argument("--force", action="store_true", help="replace an existing index at --output")
    p.add_argument("--resume", action="store_true", help="go on with a build of the same catalog and options that was "
                   "killed part way: only the images it had not featurized are (its vectors are saved as it goes, "
                   "in .OUTPUT.lookalike-build beside the output)")
    p.add_argument("--crop-pct", type=float, help="share of the picture's short side the model sees, centred "
                   f"(default {DEFAULT_FEATURES['crop_pct']}: all of it; 0.875 is the ImageNet centre crop)")
    p.add_argument("--pooling", choices=POOLINGS, help=f"how the last feature map becomes the vector "
                   f"(default {DEFAULT_FEATURES['pooling']}; gem: generalized mean, p=3)")
    p.add_argument("--tta", choices=TTAS, help=f"flip: average with the mirror image's features, for catalog "
                   f"and queries alike (default {DEFAULT_FEATURES['tta']}; none is about 1.8x faster)")
    p.add_argument("--local-features", action="store_true", help="also store each image's SIFT features, so "
                   "searches verify their best candidates geometrically (printed products, boxes, labels: "
                   "a phone photo then finds its item far more often); slower to build and to search")
    p.add_argument("--precision", default="auto", choices=("auto",) + PRECISIONS, help="arithmetic of the model on "
                   "the CPU (default auto: fp32, or bf16 where the CPU has it natively and it measures faster); "
                   "int8 is calibrated on the catalog's own images and kept in the index, about 1.5x faster, "
                   "recall@1 within 0.007 of fp32 on the shared protocols. Queries use the index's precision")
    p.add_argument("--whiten", type=_non_negative_int, default=0, metavar="D", help="PCA-whiten to D dimensions, learned "
                   "from the catalog (default 0: off; it can hurt, measure first with `evaluate`)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("search", parents=[common], help="the k most similar items of each query image")
    p.add_argument("index_dir")
    p.add_argument("queries", nargs="+", metavar="QUERY_IMAGE")
    p.add_argument("-k", type=_positive_int, default=5, help="how many hits per query (default 5)")
    p.add_argument("--filter", action="append", metavar="FIELD=VALUE", help="only items whose metadata matches (repeatable)")
    p.add_argument("--expand", type=_non_negative_int, default=0, metavar="N", help=EXPAND_HELP)
    p.add_argument("--orient", action="store_true", help=ORIENT_HELP)
    p.add_argument("--regions", action="store_true", help=REGIONS_HELP)
    p.add_argument("--camera", action="store_true", help=CAMERA_HELP)
    p.add_argument("--budget-ms", type=_positive_int, metavar="MS", help=BUDGET_HELP)
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("classify", parents=[common], help="the majority label among each query's k neighbours")
    p.add_argument("index_dir")
    p.add_argument("queries", nargs="+", metavar="QUERY_IMAGE")
    p.add_argument("-k", type=_positive_int, default=5, help="neighbours that vote (default 5)")
    p.add_argument("--label", default="label", help="the metadata field that is voted on (default label)")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("add", parents=[common], help="add a catalog's items to an index without rebuilding")
    p.add_argument("index_dir")
    p.add_argument("catalog")
    p.add_argument("--strict", action="store_true", help="an unreadable image is an error instead of a skip")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("remove", parents=[common], help="remove items by id")
    p.add_argument("index_dir")
    p.add_argument("ids", nargs="+", metavar="ID")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("info", parents=[common], help="what an index is: model, metric, kind, size")
    p.add_argument("index_dir")
    p.add_argument("--verify", action="store_true", help="also check every file against its sha256")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("doctor", parents=[common], help="check every file of an index; rebuild a damaged FAISS file")
    p.add_argument("index_dir")
    p.add_argument("--check-only", action="store_true", help="report problems without repairing anything")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("reindex", parents=[common], help="train the index again from its stored vectors "
                       "(after it has grown or shrunk: `info` says when)")
    p.add_argument("index_dir")
    p.set_defaults(func=cmd_reindex)

    p = sub.add_parser("evaluate", parents=[common], help="recall@k, precision@1 and mAP of a query catalog")
    p.add_argument("index_dir")
    p.add_argument("queries", nargs="?", help="a query catalog (same formats as build) with a label column")
    p.add_argument("--leave-one-out", action="store_true", help="query with every item of the index against the others")
    p.add_argument("--label", default="label", help="the field a correct match shares (default label)")
    p.add_argument("-k", default="1,5,10", help="comma-separated k values for recall@k (default 1,5,10)")
    p.add_argument("--expand", type=_non_negative_int, default=0, metavar="N", help=EXPAND_HELP)
    p.add_argument("--orient", action="store_true", help=ORIENT_HELP)
    p.add_argument("--regions", action="store_true", help=REGIONS_HELP)
    p.add_argument("--camera", action="store_true", help=CAMERA_HELP + "; each query photo ranked as search ranks it")
    p.add_argument("--budget-ms", type=_positive_int, metavar="MS", help=BUDGET_HELP)
    p.add_argument("--no-verify", action="store_true", help=NO_VERIFY_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("finetune", parents=[common], help="train a model on a labelled catalog (metric learning), "
                       "written as a model directory that `build --model` uses")
    p.add_argument("catalogs", nargs="+", metavar="CATALOG", help="one or more labelled catalogs (e.g. the catalog "
                   "and labelled shop photos of its items)")
    p.add_argument("--label", required=True, metavar="FIELD", help="the metadata field that says which items are "
                   "alike (e.g. label, category)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL_DIR", help="the model directory to write")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the model to start from (default {DEFAULT_MODEL})")
    p.add_argument("--epochs", type=_positive_int, default=10, help="passes over the training items (default 10); "
                   "the epoch with the best validation recall@1 is kept")
    p.add_argument("--dim", type=_positive_int, default=HEAD_DIM, help=f"length of the feature vector it makes "
                   f"(default {HEAD_DIM})")
    p.add_argument("--views", type=_positive_int, default=VIEWS, help="model inputs made of each image: the clean one, "
                   f"its mirror image and camera-like augmentations (default {VIEWS})")
    p.add_argument("--backgrounds", metavar="DIR", help="a folder of background photos: half the augmentations then "
                   "paste the catalog picture into them (perspective, 10-60%% of the frame, glare, blur), as a "
                   "camera photo shows an item")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="share of each label (with 3 items or "
                   f"more) held out to measure recall@1 (default {VAL_FRACTION})")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed of the split, the augmentations and the "
                   "training (0 or more)")
    p.add_argument("--force", action="store_true", help="replace a model at MODEL_DIR even if it measured better, "
                   "or write into a directory that holds something else")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("models", parents=[common], help="list the models that can be used")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("serve", parents=[common], help="HTTP API, SageMaker-style /invocations and the web page")
    p.add_argument("index_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    p.add_argument("--workers", type=_positive_int, default=1, help="worker processes (default 1)")
    p.add_argument("-k", type=_positive_int, default=5, help="hits per query when a request gives no k (default 5)")
    p.add_argument("--max-upload-mb", type=_positive_int, default=20, help="largest request body, in MiB (default 20)")
    p.add_argument("--max-pixels", type=_positive_int, default=40_000_000, help="largest image, in pixels (default 40M)")
    p.add_argument("--allow-urls", action="store_true", help="let requests name image URLs (private addresses stay refused)")
    p.add_argument("--api-key-file", metavar="PATH", help="file holding the key that POST/DELETE /items need "
                   "(else $LOOKALIKE_API_KEY; with neither, those routes are off)")
    p.add_argument("--protect-reads", action="store_true", help="the read routes (/search, /invocations, GET /items, "
                   "/metrics) need the key too; /livez, /readyz, the page and /static stay open, but the page's own "
                   "searches and thumbnails then fail (it sends no key)")
    p.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="let web pages from this origin (e.g. "
                   "https://shop.example) call the API; repeatable (default: none, CORS off)")
    p.add_argument("--max-queue", type=_positive_int, default=32, help="requests waiting for the model before more "
                   "are answered 429 with Retry-After (default 32)")
    p.add_argument("--upload-memory-mb", type=_positive_int, help="request bodies held in memory at once before "
                   "more are answered 429 (default 4 x --max-upload-mb)")
    p.add_argument("--body-timeout", type=_positive_int, default=20, metavar="SECONDS", help="a request body that "
                   "goes this long without a byte arriving is answered 408 (default 20)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("camera", parents=[common], help="live search from a camera or a video file (needs OpenCV)")
    p.add_argument("index_dir")
    p.add_argument("--source", default="0", help="camera number, video file or stream URL (default 0)")
    p.add_argument("--every-ms", type=_positive_int, default=200, help="at most one query per this many ms (default 200)")
    p.add_argument("-k", type=_positive_int, default=5, help="hits per query (default 5)")
    p.add_argument("--headless", action="store_true", help="no window: one JSON line per query, then the queries/s")
    p.add_argument("--max-queries", type=_positive_int, help="stop after this many queries")
    p.add_argument("--regions", choices=tuple(MODES), default="auto", help="also search with the frame's corners "
                   "and centre and score each item by its best region (an item held up to the camera fills only part "
                   "of the frame): auto (default) also searches a finer grid of smaller squares when a frame's best hit "
                   "is still neither verified nor scores well; always (the corners and centre only); never (about 3x "
                   "less featurizing)")
    p.add_argument("--orient", choices=tuple(MODES), default="auto", help="try each frame turned "
                   "by 90/180/270 degrees (a camera held sideways): auto (default) only a frame whose best hit is neither "
                   "verified nor scores well upright; always (about 4x the featurizing per query); never")
    p.add_argument("--budget-ms", type=_non_negative_int, metavar="MS",
                   help="a frame's time budget: the auto modes' second looks (turned, finer grid) are taken only when "
                   f"they are expected to fit in it (default {CAMERA_BUDGET_MS:g}; 0: always, however long they take)")
    p.set_defaults(func=cmd_camera)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.simplefilter("ignore")
            return args.func(args)
    except LookalikeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # a bug: say so, traceback only under --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
