"""Models: the registry, weights resolution, the EfficientNet-Lite key mapping, ONNX vs PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lookalike import ModelError
from lookalike.featurizer import Featurizer, preprocess
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
    featurizer = Featurizer(spec, weights)
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


def test_no_weights_offline_is_a_clear_error_never_random_weights(monkeypatch):
    monkeypatch.setenv("LOOKALIKE_OFFLINE", "1")
    with pytest.raises(ModelError, match="--weights"):
        resolve_weights(get_spec("resnet18"))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_weights(get_spec("resnet18"), "/nonexistent/weights.pth")


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
