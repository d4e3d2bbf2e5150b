"""Models: the registry, weights resolution, the EfficientNet-Lite key mapping, ONNX vs PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lookalike import ModelError
from lookalike.featurizer import (EXPORT_VERSION, GRID, GRID_SCALE, REGION_SCALE, REGIONS, Featurizer, grid_boxes,
                                  preprocess, region_boxes)
from lookalike.models import REGISTRY, create_torch_model, get_spec, resolve_weights

LITE = [name for name in REGISTRY if name.startswith("efficientnet-lite")]


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


@pytest.mark.parametrize("name", LITE)
def test_packaged_weights_classify_a_real_cat_and_an_espresso(name):
    """Proves the state-dict renaming: ImageNet classes 281-285 are cats, 967 is espresso."""
    import torch

    spec = get_spec(name)
    model = create_torch_model(spec, resolve_weights(spec), with_classifier=True)
    batch = np.stack([preprocess(_photo("chelsea"), spec), preprocess(_photo("coffee"), spec)])
    with torch.no_grad():
        top = model(torch.from_numpy(batch)).argmax(dim=1).tolist()
    assert 281 <= top[0] <= 285, f"{name} put the cat photo in class {top[0]}"
    assert top[1] == 967, f"{name} put the espresso photo in class {top[1]}"


def test_onnx_and_pytorch_vectors_agree(tmp_path, monkeypatch):
    import torch

    from conftest import FASHION

    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    spec = get_spec("efficientnet-lite0")
    weights = resolve_weights(spec)
    images = [_photo("chelsea"), _photo("astronaut")] + sorted(FASHION.glob("images/*.jpg"))[:6]
    featurizer = Featurizer(spec, weights, runtime="onnxruntime")
    assert featurizer.runtime == "onnxruntime"
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx")), "the export is cached in LOOKALIKE_CACHE"
    onnx_vectors = featurizer.featurize(images, strict=True).vectors
    model = create_torch_model(spec, weights)
    with torch.no_grad():
        torch_vectors = model(torch.from_numpy(np.stack([featurizer.load(x) for x in images]))).numpy()
    assert onnx_vectors.shape == torch_vectors.shape == (len(images), 1280)
    cos = (onnx_vectors * torch_vectors).sum(1) / (
        np.linalg.norm(onnx_vectors, axis=1) * np.linalg.norm(torch_vectors, axis=1)
    )
    assert cos.min() >= 0.999


def test_preprocessing_comes_from_the_spec():
    for name, size in [("efficientnet-lite0", 224), ("efficientnet-lite1", 240), ("efficientnet-lite2", 260)]:
        spec = get_spec(name)
        assert spec.input_size == size and spec.mean == (0.5, 0.5, 0.5)
        x = preprocess(_photo("astronaut"), spec)
        assert x.shape == (3, size, size) and x.dtype == np.float32
        assert -1.0 - 1e-6 <= x.min() and x.max() <= 1.0 + 1e-6


def test_unknown_model_names_close_matches():
    with pytest.raises(ModelError, match="efficientnet-lite0"):
        get_spec("efficientnet-lit0")
    with pytest.raises(ModelError, match="unknown timm model"):
        get_spec("timm:no_such_net_at_all")


def test_no_weights_offline_is_a_clear_error_never_random_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOKALIKE_OFFLINE", "1")
    with pytest.raises(ModelError, match="--weights"):
        resolve_weights(get_spec("resnet18"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_weights(get_spec("resnet18"), "/nonexistent/weights.pth")
    with pytest.raises(ModelError, match="is a folder, not a weights file .* goes to --model"):
        resolve_weights(get_spec("resnet18"), tmp_path)


def test_local_weights_file_for_a_timm_model(tmp_path):
    """--weights PATH: a real state dict file is loaded (classifier dropped), wrong ones refused."""
    import timm
    import torch

    spec = get_spec("timm:resnet18")
    source = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    weights = resolve_weights(spec, path)
    assert weights.source == "file" and len(weights.sha256) == 64
    model = create_torch_model(spec, weights)
    assert model.num_features == 512
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)

    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ModelError, match="do not fit"):
        create_torch_model(spec, resolve_weights(spec, wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(ModelError, match="not a loadable"):
        create_torch_model(spec, resolve_weights(spec, garbage))


def test_weights_that_give_nan_features_build_nothing(tmp_path):
    """A state dict of NaN (damaged or badly trained weights) loads and runs, but its features
    could never be searched: the build is refused and nothing is written."""
    import timm
    import torch

    from conftest import SAMPLE, write_csv
    from lookalike import VisualSearch

    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    images = sorted((SAMPLE / "images").glob("*.jpg"))[:3]
    catalog = write_csv(tmp_path / "c.csv", ["id", "image"], [[p.stem, str(p)] for p in images])
    with pytest.raises(ModelError, match="NaN or infinite features for 3 of 3 images"):
        VisualSearch.build(catalog, tmp_path / "index", model="timm:resnet18", weights=path, progress=False)
    assert not (tmp_path / "index").exists()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU (runs on the device machine)")
def test_cuda_fp16_vectors_agree_with_onnx_on_cpu():
    from conftest import FASHION

    spec = get_spec("efficientnet-lite0")
    weights = resolve_weights(spec)
    images = [_photo("chelsea"), _photo("coffee")] + sorted(FASHION.glob("images/*.jpg"))[:30]
    cpu = Featurizer(spec, weights).featurize(images, strict=True).vectors
    gpu_featurizer = Featurizer(spec, weights, device="cuda")
    assert gpu_featurizer.runtime == "torch-cuda-fp16"
    gpu = gpu_featurizer.featurize(images, strict=True).vectors
    cos = (cpu * gpu).sum(1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(gpu, axis=1))
    assert cos.min() >= 0.999, cos.min()


def test_cuda_without_a_gpu_is_a_clear_error():
    if _cuda_available():
        pytest.skip("this machine has a GPU")
    spec = get_spec("efficientnet-lite0")
    with pytest.raises(ModelError, match="no CUDA GPU"):
        Featurizer(spec, resolve_weights(spec), device="cuda")


def test_feature_options_are_checked_and_default_to_the_whole_picture_with_flip():
    from lookalike.models import DEFAULT_FEATURES, spec_from_manifest, with_features

    spec = with_features(get_spec("efficientnet-lite0"))
    assert (spec.crop_pct, spec.pooling, spec.tta) == (1.0, "avg", "flip") == tuple(DEFAULT_FEATURES.values())
    assert spec.resize_size == 224 and spec.features() == {"pooling": "avg", "tta": "flip"}
    plain = with_features(get_spec("efficientnet-lite0"), crop_pct=0.875, tta="none")
    assert (plain.resize_size, plain.tta) == (256, "none")
    for bad, message in [(dict(crop_pct=0.1), "crop_pct must be a number from 0.25"), (dict(crop_pct=True), "crop_pct"),
                         (dict(pooling="max"), "unknown pooling 'max'"), (dict(tta="rotate"), "unknown tta 'rotate'")]:
        with pytest.raises(ModelError, match=message):
            with_features(get_spec("efficientnet-lite0"), **bad)
    # an index written before feature options existed was made with average pooling and no flip
    old = {"name": "efficientnet-lite0", "preprocessing": {"input_size": 224, "crop_pct": 0.875}}
    assert spec_from_manifest(old).features() == {"pooling": "avg", "tta": "none"}
    assert spec_from_manifest(dict(old, features=spec.features())).features() == spec.features()


def test_flip_averages_the_picture_and_its_mirror_image(tmp_path, monkeypatch):
    from lookalike.models import with_features

    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    square = _photo("chelsea").crop((0, 0, 300, 300))  # square: the mirror of the input is the input of the mirror
    weights = resolve_weights(get_spec("efficientnet-lite0"))
    plain = Featurizer(with_features(get_spec("efficientnet-lite0"), tta="none"), weights)
    flip = Featurizer(with_features(get_spec("efficientnet-lite0"), tta="flip"), weights)
    mirrored = square.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    a, b = plain.featurize([square, mirrored], strict=True).vectors
    both = flip.featurize([square, mirrored, square], strict=True).vectors
    np.testing.assert_allclose(both[0], (a + b) / 2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(both[1], both[0], rtol=1e-4, atol=1e-5)  # a picture and its mirror: one vector
    alone = flip.featurize([square], strict=True).vectors[0]  # a lone query runs the mirror on a second core
    np.testing.assert_allclose(alone, both[0], rtol=1e-4, atol=1e-5)
    assert not np.allclose(a, b, atol=1e-3)


def test_gem_pooling_exports_to_onnx_and_agrees_with_pytorch(tmp_path, monkeypatch):
    import torch

    from lookalike.models import with_features

    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    spec = with_features(get_spec("efficientnet-lite0"), pooling="gem", tta="none")
    weights = resolve_weights(spec)
    featurizer = Featurizer(spec, weights)
    assert [p.name for p in (tmp_path / "cache" / "onnx").glob("*.onnx")][0].endswith(f"-gem-v{EXPORT_VERSION}.onnx")
    images = [_photo("chelsea"), _photo("coffee")]
    onnx_vectors = featurizer.featurize(images, strict=True).vectors
    with torch.no_grad():
        pixels = torch.from_numpy(np.stack([featurizer.load(x) for x in images]))
        torch_vectors = create_torch_model(spec, weights)(pixels).numpy()
        feature_map = create_torch_model(get_spec("efficientnet-lite0"), weights).forward_features(pixels)
    expected = feature_map.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3).numpy()
    np.testing.assert_allclose(torch_vectors, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(onnx_vectors, torch_vectors, rtol=2e-3, atol=2e-3)
    avg = Featurizer(get_spec("efficientnet-lite0"), weights).featurize(images, strict=True).vectors
    assert not np.allclose(avg, onnx_vectors, atol=1e-2)


def test_query_regions_and_the_finer_grid_cover_the_frame():
    """region_boxes: the whole picture, then squares at the corners and the centre; grid_boxes
    (regions="auto"'s second look): GRID x GRID smaller squares from edge to edge, row by row."""
    for width, height in ((640, 480), (480, 640), (300, 300)):
        regions = region_boxes(width, height)
        assert len(regions) == REGIONS and regions[0] == (0, 0, width, height)
        side = round(REGION_SCALE * min(width, height))
        assert all(r - l == side and b - t == side for l, t, r, b in regions[1:])
        grid = grid_boxes(width, height)
        side = round(GRID_SCALE * min(width, height))
        assert len(grid) == GRID**2 and all(r - l == side and b - t == side for l, t, r, b in grid)
        assert grid[0][:2] == (0, 0) and grid[-1][2:] == (width, height)  # corner to corner
        assert all(0 <= l and 0 <= t and r <= width and b <= height for l, t, r, b in grid)
        assert [t for _, t, _, _ in grid] == sorted(t for _, t, _, _ in grid)  # row by row
    assert grid_boxes(640, 480)[:3] == [(0, 0, 192, 192), (224, 0, 416, 192), (448, 0, 640, 192)]
