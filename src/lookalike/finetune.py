"""Fine-tune a feature model on a labelled catalog and write it as a model directory.

What trains, and why (issue 6's GPU comparison: training the last blocks did as well as training
the whole network): the base model is split into a frozen trunk and a trainable tail
(EfficientNet: its last block stage, ``conv_head`` and its batch norm; ResNet: ``layer4``), and a
linear projection head is added, initialised to the principal directions of the catalog's own
features, so that epoch 0 is the pretrained model.

How it stays fast on a CPU: every image is decoded once and turned into ``views`` model inputs,
the clean one (as ``build`` preprocesses it), its mirror image and camera-like augmentations
(a perspective crop of 35-100 % of the picture, rotation, colour and light changes, blur,
glare). With ``backgrounds`` every other augmentation is a synthetic camera photo instead: the
picture pasted into a real background photo (``synthetic.camera_photo``). The trunk runs once on
each view (ONNX Runtime on the CPU) and its outputs stay in memory as float16, so an epoch runs
only the small tail, on one random view of each item.

The loss is proxy-anchor (Kim et al., CVPR 2020): one learned proxy per label, every item pulled
towards its label's proxy and pushed from the others, with the hard examples weighted most. On
the fashion split it gave test precision@1 0.842 against 0.828 for a CosFace-style softmax
(scale 30, margin 0.3); training a second block stage too reached no better validation
recall@1 in 7 epochs (0.861, against 0.876 for one stage) at 5x the time per epoch.

A validation split (``val_fraction`` of each label that has at least 3 items, by ``seed``) is
searched against the training items with the features ``build`` would make (the clean view and
its mirror image averaged): its recall@1 before training and after every epoch is reported, and
the best epoch is what is saved. A catalog where no label has 3 items (a shop's catalog, one
picture per item, ``--label id``) holds out each item's last view instead (a synthetic camera
photo when there are backgrounds) and searches it against all the items.

A model directory holds ``models.MODEL_CONFIG`` (base model, head, preprocessing, the label and
catalog it learned from, the metrics it reached, each epoch's history) and its weights
(``weights-<sha>.safetensors``: the backbone and the head). The config is written last, by
rename, so a crash leaves the previous model whole; a model with a better validation recall is
replaced only with ``force``, and the weights of a replaced model stay (indexes built with it
still featurize their queries with them). ``lookalike build --model MODEL_DIR`` and the rest use
it like any other model; its ONNX export is cached like theirs.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import CatalogError, ImageError, ModelError
from .featurizer import crop, export_module, normalize
from .images import DEFAULT_POLICY, ImagePolicy, load_image
from .models import (DEFAULT_MODEL, MODEL_CONFIG, MODEL_FORMAT, create_torch_model, embedding_net, file_sha256,
                     get_spec, is_model_dir, read_model_config, resolve_weights, with_features)
from .runtimes import OnnxRuntime, cache_dir, cpu_count
from .synthetic import camera_photo
from .types import Item, ModelSpec

VIEWS = 8  # model inputs cached per image: clean, mirror, and 6 camera-like augmentations
HEAD_DIM = 512
VAL_FRACTION = 0.15
MIN_VAL_LABEL = 3  # a label needs this many items to give one to the validation split
BATCH = 32
LR_TAIL, LR_HEAD, LR_PROXY = 5e-4, 5e-3, 1e-2
TAIL_STAGES = 1  # EfficientNet block stages that train
PCA_SAMPLE = 4096  # views the projection head's initial directions are learned from
MARGIN, ALPHA = 0.1, 32.0  # proxy-anchor's margin and scale, as its paper
TRUNK_VERSION = 1  # bump when the trunk export changes, so cached files are remade


@dataclass
class FinetuneReport:
    """What ``finetune`` did: the split, each epoch's validation recall@1, what was saved."""

    model_dir: str
    base: str
    label: str
    train_items: int
    val_items: int
    labels: int
    epochs: int
    best_epoch: int
    val_recall_at_1_before: float
    val_recall_at_1: float
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # items not learned from, and why
    seconds: float = 0.0
    val_ids: list[str] = field(default_factory=list)  # the items held out (not in to_dict: it can be long)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_dir": self.model_dir, "base": self.base, "label": self.label,
            "train_items": self.train_items, "val_items": self.val_items, "labels": self.labels,
            "epochs": self.epochs, "best_epoch": self.best_epoch,
            "val_recall_at_1_before": round(self.val_recall_at_1_before, 4),
            "val_recall_at_1": round(self.val_recall_at_1, 4),
            "history": self.history, "skipped": self.skipped, "seconds": round(self.seconds, 1),
        }


def finetune(
    items: Sequence[Item],
    out: str | os.PathLike,
    *,
    label: str = "label",
    base: str = DEFAULT_MODEL,
    catalog_name: str = "<items>",
    epochs: int = 10,
    device: str = "cpu",
    head_dim: int = HEAD_DIM,
    views: int = VIEWS,
    val_fraction: float = VAL_FRACTION,
    seed: int = 0,
    backgrounds: Sequence[Path] = (),
    force: bool = False,
    policy: ImagePolicy = DEFAULT_POLICY,
    progress: Callable[[int, str], Any] | None = None,
    say: Callable[[str], None] | None = None,
) -> FinetuneReport:
    """Fine-tune ``base`` on ``items`` grouped by their metadata field ``label``; write ``out``.

    ``progress(total, what)`` makes a bar (an object with ``update(n)`` and ``close()``);
    ``say(line)`` reports the validation recall before training and after each epoch.
    """
    start = time.perf_counter()
    say = say or (lambda line: None)
    _check_options(epochs, device, head_dim, views, val_fraction)
    out = Path(out).expanduser()
    _check_out(out, force)
    spec = with_features(get_spec(base))
    if spec.weights_file:
        raise ModelError(f"{base}: already a fine-tuned model; fine-tune from its base "
                         f"({read_model_config(spec.name)['base']}) instead", subject=base)
    weights = resolve_weights(spec)
    labelled, skipped = _labelled(items, label)
    train, val = _split(labelled, val_fraction, seed)
    _check_split(labelled, train, val, label, catalog_name, views)  # before the slow part; again once images are read

    import torch

    torch.manual_seed(seed)
    model = create_torch_model(spec, weights)
    trunk, tail = _split_model(model, spec)
    feats, kept, unreadable = _trunk_views(trunk, spec, weights, [it.image for it, _ in labelled], views, seed,
                                           backgrounds, device, policy, progress)
    skipped += [{"id": labelled[i][0].id, "reason": str(err)} for i, err in unreadable]
    position = {i: p for p, i in enumerate(kept)}
    train = [i for i in train if i in position]
    val = [i for i in val if i in position]
    names = _check_split(labelled, train, val, label, catalog_name, views)
    held_view = not val  # no label can spare an item: each item's last view is held out instead
    if held_view:
        val = list(train)
    classes = {name: c for c, name in enumerate(names)}
    y_train = np.array([classes[labelled[i][1]] for i in train])
    val_names = [labelled[i][1] for i in val]
    dev = torch.device(device)
    feats_t = torch.from_numpy(feats)  # [items, views, C, H, W] float16, on the CPU
    train_pos = np.array([position[i] for i in train])
    val_pos = np.array([position[i] for i in val])

    last = feats.shape[1] - 1
    val_views = feats_t[val_pos][:, [last, last]] if held_view else feats_t[val_pos, :2]
    trained_views = feats.shape[1] - held_view
    validation = "a held-out view of each item" if held_view else "held-out items"

    tail.to(dev)
    head = _pca_head(tail, feats_t[train_pos, :trained_views], head_dim, dev, seed)
    net = embedding_net(model, head_dim)
    net.head = head
    names_train = [labelled[i][1] for i in train]

    def val_recall() -> float:
        g = _embed(tail, head, feats_t[train_pos, :2], dev)
        q = _embed(tail, head, val_views, dev)
        nearest = (q @ g.T).argmax(axis=1)
        return float(np.mean([names_train[j] == n for j, n in zip(nearest, val_names)]))

    before = val_recall()
    say(f"epoch 0 (before training): validation recall@1 {before:.4f} "
        f"({len(train)} training items, {len(names)} labels; validation: "
        + (f"{validation})" if held_view else f"{len(val)} {validation})"))
    history = [{"epoch": 0, "loss": None, "val_recall_at_1": round(before, 4), "seconds": 0.0}]
    best, best_epoch, best_state = before, 0, _state(net)

    proxies = torch.nn.Parameter(torch.randn(len(names), head_dim, device=dev) * 0.01)
    torch.nn.init.kaiming_normal_(proxies, mode="fan_out")
    optimizer = torch.optim.AdamW([
        {"params": [p for p in tail.parameters() if p.requires_grad], "lr": LR_TAIL},
        {"params": head.parameters(), "lr": LR_HEAD},
        {"params": [proxies], "lr": LR_PROXY, "weight_decay": 0.0},
    ], weight_decay=1e-4)
    steps = epochs * math.ceil(len(train) / BATCH)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng(seed)
    labels_t = torch.from_numpy(y_train).to(dev)
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(len(train))
        bar = progress(len(train), f"epoch {epoch}/{epochs}") if progress else None
        total, batches = 0.0, 0
        _train_mode(tail, head)
        for s in range(0, len(order), BATCH):
            chosen = order[s:s + BATCH]
            if len(chosen) < 2:
                continue
            view = rng.integers(0, trained_views, len(chosen))
            x = feats_t[train_pos[chosen], view].to(dev, torch.float32)
            z = torch.nn.functional.normalize(head(tail(x)), dim=1)
            loss = _proxy_anchor(z, labels_t[chosen], proxies)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total, batches = total + loss.item(), batches + 1
            if bar:
                bar.update(len(chosen))
        if bar:
            bar.close()
        recall = val_recall()
        seconds = time.perf_counter() - t0
        history.append({"epoch": epoch, "loss": round(total / max(batches, 1), 4),
                        "val_recall_at_1": round(recall, 4), "seconds": round(seconds, 1)})
        better = recall > best
        if better:
            best, best_epoch, best_state = recall, epoch, _state(net)
        say(f"epoch {epoch}: loss {total / max(batches, 1):.4f}, validation recall@1 {recall:.4f}"
            + (" (best so far)" if better else "") + f", {seconds:.1f} s")
    if best_epoch == 0:
        say("no epoch beat the pretrained features on the validation split; the model saved is the "
            "pretrained one with its projection head")

    report = FinetuneReport(
        model_dir=str(out), base=spec.name, label=label, train_items=len(train), val_items=len(val),
        labels=len(names), epochs=epochs, best_epoch=best_epoch, val_recall_at_1_before=before,
        val_recall_at_1=best, history=history, skipped=skipped, val_ids=[labelled[i][0].id for i in val],
    )
    config = {
        "format": MODEL_FORMAT,
        "base": spec.name,
        "arch": spec.arch,
        "head_dim": head_dim,
        "preprocessing": spec.preprocessing(),
        "features": spec.features(),
        "label": label,
        "labels": names if len(names) <= 1000 else len(names),
        "catalog": {"name": catalog_name, "items": len(items), "learned_from": len(set(train) | set(val))},
        "training": {"trains": _TRAINS[_family(model)], "loss": "proxy-anchor", "margin": MARGIN, "alpha": ALPHA,
                     "epochs": epochs, "views": views, "synthetic_views": bool(backgrounds), "batch": BATCH,
                     "device": device, "seed": seed, "val_fraction": val_fraction, "validation": validation},
        "metrics": {"val_recall_at_1": round(best, 4), "val_recall_at_1_before": round(before, 4),
                    "best_epoch": best_epoch, "train_items": len(train), "val_items": len(val)},
        "history": history,
        "lookalike_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _save(out, best_state, config, force)
    report.seconds = time.perf_counter() - start
    return report


# --- checks ----------------------------------------------------------------------------------


def _check_options(epochs, device, head_dim, views, val_fraction) -> None:
    def whole(name, value, low):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ModelError(f"{name} must be a whole number of at least {low}, got {value!r}", subject=value)

    whole("epochs", epochs, 1)
    whole("head dimension", head_dim, 8)
    whole("views", views, 2)
    if device not in ("cpu", "cuda"):
        raise ModelError(f"unknown device {device!r}; use cpu or cuda", subject=device)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ModelError("device cuda asked for, but PyTorch sees no CUDA GPU", subject="cuda")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ModelError(f"validation fraction must be between 0 and 1, got {val_fraction!r}", subject=val_fraction)


def _check_out(out: Path, force: bool) -> None:
    """A model directory may be replaced (by a better model, or with force); anything else there is kept."""
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is not a directory", subject=str(out))
    if out.is_dir() and any(out.iterdir()) and not is_model_dir(out) and not force:
        raise ModelError(f"{out}: exists, is not empty and holds no model; choose another directory or pass "
                         "--force to write the model into it", subject=str(out))
    if is_model_dir(out):
        read_model_config(out)  # a damaged config is an error now, not after training


def _labelled(items: Sequence[Item], label: str) -> tuple[list[tuple[Item, str]], list[dict[str, str]]]:
    """(item, its label) of the items that have one, and those that do not."""
    if not items:
        raise CatalogError("fine-tuning needs a catalog with items", subject="catalog")
    out, skipped = [], []
    for it in items:
        value = it.id if label == "id" else it.metadata.get(label, it.label if label == "label" else None)
        if value is None or str(value).strip() == "":
            skipped.append({"id": it.id, "reason": f"no {label}"})
        else:
            out.append((it, str(value)))
    if not out:
        raise CatalogError(f"no item has a value in field {label!r} (fields: "
                           f"{', '.join(sorted(items[0].metadata)) or 'none'})", subject=label)
    return out, skipped


def _check_split(labelled, train: list[int], val: list[int], label: str, catalog_name: str, views: int) -> list[str]:
    """The labels to learn, sorted; CatalogError or ModelError if there is too little to learn or to measure."""
    names = sorted({labelled[i][1] for i in train + val})
    if len(names) < 2:
        raise CatalogError(f"{catalog_name}: fine-tuning needs at least 2 labels in field {label!r} (found "
                           f"{len(names)})", subject=catalog_name)
    if not val and views < 3:
        raise ModelError(f"{catalog_name}: no label has {MIN_VAL_LABEL} items to validate on, so a view of each "
                         "item is held out instead, which needs views of at least 3", subject=views)
    return names


def _split(labelled: list[tuple[Item, str]], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Training and validation positions: ``fraction`` of each label with MIN_VAL_LABEL items or more
    (at least one, and never all) is held out, drawn by ``seed``; smaller labels all train."""
    by_label: dict[str, list[int]] = {}
    for i, (_, name) in enumerate(labelled):
        by_label.setdefault(name, []).append(i)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for name in sorted(by_label):
        members = by_label[name]
        if len(members) < MIN_VAL_LABEL:
            train += members
            continue
        drawn = rng.permutation(members)
        n = min(max(1, round(fraction * len(members))), len(members) - 1)  # and at least one to learn from
        val += sorted(drawn[:n].tolist())
        train += sorted(drawn[n:].tolist())
    return sorted(train), sorted(val)


# --- the model's parts -----------------------------------------------------------------------

_TRAINS = {"efficientnet": "last block stage, conv_head, head", "resnet": "layer4, head"}


def _family(model) -> str:
    if hasattr(model, "blocks") and hasattr(model, "conv_head"):
        return "efficientnet"
    if hasattr(model, "layer4"):
        return "resnet"
    raise ModelError(f"fine-tuning knows EfficientNet and ResNet models, not {type(model).__name__}",
                     subject=type(model).__name__)


def _split_model(model, spec: ModelSpec):
    """(frozen trunk, trainable tail) sharing the model's modules: tail(trunk(x)) = model(x)."""
    import torch

    family = _family(model)
    if family == "efficientnet":
        trunk = [model.conv_stem, model.bn1, *model.blocks[:-TAIL_STAGES]]
        tail = [*model.blocks[-TAIL_STAGES:], model.conv_head, model.bn2, model.global_pool]
    else:
        trunk = [model.conv1, model.bn1, model.act1, model.maxpool, model.layer1, model.layer2, model.layer3]
        tail = [model.layer4, model.global_pool]
    trunk, tail = torch.nn.Sequential(*trunk).eval(), torch.nn.Sequential(*tail)
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk, tail


def _train_mode(tail, head) -> None:
    """Train the weights, keep batch-norm statistics as pretrained (small batches would spoil them)."""
    import torch

    tail.train()
    head.train()
    for m in tail.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def _pca_head(tail, feats, dim: int, dev, seed: int):
    """A bias-free linear layer onto the ``dim`` principal directions of the tail's features of
    ``feats`` [items, views, C, H, W] (all views, so a small catalog still has directions enough;
    up to PCA_SAMPLE of them)."""
    import torch

    flat = feats.flatten(0, 1)
    pick = np.sort(np.random.default_rng(seed).permutation(len(flat))[:PCA_SAMPLE])
    x = _forward(tail, None, flat[pick], dev)
    width = x.shape[1]
    if dim > width:
        raise ModelError(f"head dimension {dim} is larger than the model's {width} features", subject=dim)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    basis = np.zeros((dim, width), np.float32)
    rows = min(dim, vt.shape[0])
    basis[:rows] = vt[:rows]
    if rows < dim:  # fewer views than dimensions: the rest stays random and orthogonal enough
        basis[rows:] = np.random.default_rng(0).standard_normal((dim - rows, width)) / math.sqrt(width)
    head = torch.nn.Linear(width, dim, bias=False).to(dev)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(basis))
    return head


def _forward(tail, head, views, dev) -> np.ndarray:
    """The tail (and the head, unless None) run on trunk outputs [m, C, H, W], 256 at a time: [m, d]."""
    import torch

    tail.eval()
    with torch.no_grad():
        out = []
        for s in range(0, len(views), 256):
            z = tail(views[s:s + 256].to(dev, torch.float32))
            out.append((z if head is None else head(z)).cpu().numpy())
    return np.concatenate(out)


def _embed(tail, head, feats, dev) -> np.ndarray:
    """The features ``build`` makes from trunk outputs [n, 2, C, H, W] (clean and mirror view):
    their mean, L2-normalised."""
    z = _forward(tail, head, feats.flatten(0, 1), dev)
    z = z.reshape(len(feats), 2, -1).mean(axis=1)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def _proxy_anchor(z, labels, proxies):
    """Proxy-anchor loss of L2-normalised embeddings ``z`` with integer ``labels``."""
    import torch

    p = torch.nn.functional.normalize(proxies, dim=1)
    cos = z @ p.T  # [batch, proxies]
    positive = torch.nn.functional.one_hot(labels, len(p)).bool()
    pos_exp = torch.where(positive, torch.exp(-ALPHA * (cos - MARGIN)), torch.zeros_like(cos))
    neg_exp = torch.where(~positive, torch.exp(ALPHA * (cos + MARGIN)), torch.zeros_like(cos))
    with_pos = positive.any(dim=0)
    pos_term = torch.log1p(pos_exp.sum(dim=0)[with_pos]).sum() / with_pos.sum().clamp(min=1)
    neg_term = torch.log1p(neg_exp.sum(dim=0)).sum() / len(p)
    return pos_term + neg_term


def _state(net) -> dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}


# --- the views and the trunk -----------------------------------------------------------------


def _trunk_views(trunk, spec: ModelSpec, weights, sources: list, views: int, seed: int, backgrounds, device: str,
                 policy: ImagePolicy, progress) -> tuple[np.ndarray, list[int], list[tuple[int, ImageError]]]:
    """Trunk outputs of ``views`` views of each readable source: float16 [n, views, C, H, W],
    the positions of the readable sources, and (position, error) of the others."""
    run = _trunk_runner(trunk, spec, weights, device)
    per_view = 2 * int(np.prod(run(np.zeros((1, 3, spec.input_size, spec.input_size), np.float32)).shape))
    need, have = per_view * views * len(sources), _memory_bytes()
    if need > have // 2:
        raise ModelError(f"caching {views} views of {len(sources)} images takes {need / 2**30:.1f} GiB, more than "
                         f"half this machine's {have / 2**30:.1f} GiB; pass fewer views or fine-tune on a sample "
                         "of the catalog", subject=len(sources))
    bar = progress(len(sources), "decoding and caching views") if progress else None

    def make(i: int):
        try:
            img = load_image(sources[i], policy=policy, draft_size=2 * spec.input_size)
        except ImageError as exc:
            return i, None, exc
        return i, np.stack(camera_views(img, spec, views, np.random.default_rng([seed, i]), backgrounds)), None

    feats: list[np.ndarray] = []
    kept: list[int] = []
    errors: list[tuple[int, ImageError]] = []
    pending: list[np.ndarray] = []

    def flush():
        if pending:
            pixels = np.stack([normalize(v, spec) for block in pending for v in block])
            out = run(pixels).astype(np.float16)
            feats.extend(out.reshape(len(pending), views, *out.shape[1:]))
            pending.clear()

    try:
        with ThreadPoolExecutor(max_workers=cpu_count(), thread_name_prefix="lookalike-views") as pool:
            for i, block, err in pool.map(make, range(len(sources))):
                if err is not None:
                    errors.append((i, err))
                else:
                    kept.append(i)
                    pending.append(block)
                    if len(pending) * views >= 64:
                        flush()
                if bar:
                    bar.update(1)
            flush()
    finally:
        if bar:
            bar.close()
    if not feats:
        raise CatalogError(f"none of the {len(sources)} images could be read", subject="catalog")
    return np.stack(feats), kept, errors


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 8 << 30


def _trunk_runner(trunk, spec: ModelSpec, weights, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function float32 pixels [n, 3, H, W] -> trunk outputs: ONNX Runtime (exported once to the
    user cache) on the CPU, PyTorch on CUDA."""
    import torch

    if device == "cuda":
        trunk = trunk.to("cuda")

        def run_cuda(pixels: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return trunk(torch.from_numpy(pixels).to("cuda")).float().cpu().numpy()

        return run_cuda
    depth = sum(1 for _ in trunk.children())
    key = f"trunk{depth}-{spec.arch}-{weights.sha256[:16]}-{spec.input_size}px-v{TRUNK_VERSION}.onnx"
    path = cache_dir() / "onnx" / key
    if not path.is_file():
        export_module(_copy(trunk), spec.input_size, path, f"{spec.name} trunk")
    runtime = OnnxRuntime(path, "fp32", cpu_count())
    return lambda pixels: runtime.run(pixels, alone=True)  # one batch at a time, on every core


def _copy(module):
    import copy

    return copy.deepcopy(module)  # the export fixes its padding; the model trained keeps its own


def camera_views(img, spec: ModelSpec, views: int, rng: np.random.Generator,
                 backgrounds: Sequence[Path] = ()) -> list[np.ndarray]:
    """``views`` uint8 [H, W, 3] model inputs of a PIL image: the clean one as ``build`` makes it,
    its mirror image, then camera-like augmentations; with ``backgrounds``, every other one is a
    synthetic camera photo instead (``synthetic.camera_photo``: the picture pasted into one of
    them, 10-60 % of the frame), seen whole as a query photo is."""
    from PIL import Image

    clean = crop(img, spec)
    out = [clean, np.ascontiguousarray(clean[:, ::-1])]
    pixels = np.asarray(img)
    for k in range(views - 2):
        if backgrounds and k % 2 == (views - 3) % 2:  # the last view is one (the held-out view, if any)
            photo, _ = camera_photo(pixels, backgrounds, False, rng)
            out.append(crop(Image.fromarray(photo), spec))
        else:
            out.append(_augment(pixels, spec.input_size, rng))
    return out


def _augment(pixels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One camera-like view: a tilted, perspective crop of 35-100 % of the picture, maybe mirrored,
    under changed contrast, brightness, saturation and colour, maybe blurred or with glare."""
    import cv2

    h, w = pixels.shape[:2]
    area = rng.uniform(0.35, 1.0) * w * h
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = min(w, math.sqrt(area * aspect)), min(h, math.sqrt(area / aspect))
    cx, cy = rng.uniform(cw / 2, w - cw / 2), rng.uniform(ch / 2, h - ch / 2)
    corners = np.array([[-cw, -ch], [cw, -ch], [cw, ch], [-cw, ch]], np.float32) / 2
    corners += rng.uniform(-0.1, 0.1, (4, 2)).astype(np.float32) * [cw, ch]
    angle = math.radians(rng.uniform(-20, 20))
    turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], np.float32)
    src = corners @ turn.T + [cx, cy]
    dst = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float32)
    if rng.random() < 0.5:
        dst = dst[[1, 0, 3, 2]]
    matrix = cv2.getPerspectiveTransform(src.astype(np.float32), dst)
    view = cv2.warpPerspective(pixels, matrix, (size, size), flags=cv2.INTER_AREA if cw > 2 * size else cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE).astype(np.float32)
    gray = view.mean(axis=2, keepdims=True)
    view = gray + rng.uniform(0.7, 1.3) * (view - gray)  # saturation
    view = (view - 128) * rng.uniform(0.75, 1.25) + 128 + rng.uniform(-30, 30)  # contrast, brightness
    view *= rng.uniform(0.9, 1.1, 3).astype(np.float32)  # colour cast
    if rng.random() < 0.25:  # glare: a white radial gradient
        yy, xx = np.mgrid[0:size, 0:size]
        gx, gy, radius = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.15, 0.5) * size
        d = np.sqrt((xx - gx) ** 2 + (yy - gy) ** 2)
        view += (rng.uniform(0, 150) * np.maximum(0, 1 - d / radius) ** 2)[..., None]
    if rng.random() < 0.4:
        view = cv2.GaussianBlur(view, (0, 0), rng.uniform(0.3, 1.5))
    return np.clip(view, 0, 255).astype(np.uint8)


# --- saving ----------------------------------------------------------------------------------


def _save(out: Path, state: dict[str, Any], config: dict[str, Any], force: bool) -> None:
    """Write the weights, then the config by rename; replace a better model only with ``force``."""
    from safetensors.torch import save_file

    if is_model_dir(out) and not force:
        old = read_model_config(out).get("metrics", {}).get("val_recall_at_1")
        new = config["metrics"]["val_recall_at_1"]
        if isinstance(old, (int, float)) and old > new:
            raise ModelError(f"{out}: holds a model with validation recall@1 {old:.4f}, better than this one's "
                             f"{new:.4f}; pass --force to replace it, or choose another directory", subject=str(out))
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".weights.", suffix=".tmp", dir=out)
    os.close(fd)
    try:
        save_file(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        sha = file_sha256(tmp)
        name = f"weights-{sha[:16]}.safetensors"
        os.replace(tmp, out / name)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    config = dict(config, weights=name, weights_sha256=sha)
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".tmp", dir=out)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MODEL_CONFIG)
    # The weights of a model replaced stay: indexes built with it still run their queries on them.
