"""Runtimes and precisions: ONNX Runtime, OpenVINO and PyTorch agree; auto remembers its choice;
int8 indexes carry their own calibrated model; bf16 only where the CPU has it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import COIL, DATA, FASHION, write_csv
from lookalike import ModelError, VisualSearch
from lookalike.featurizer import Featurizer
from lookalike.models import get_spec, resolve_weights, with_features
from lookalike.runtimes import CHOICE_FILE, int8_saturates, native_bf16

IMAGES = sorted(FASHION.glob("images/*.jpg"))[:12] + sorted(COIL.glob("*.png"))[:4]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def spec_weights():
    spec = with_features(get_spec("efficientnet-lite0"))
    return spec, resolve_weights(spec)


def test_fp32_runtimes_give_the_same_vectors(spec_weights):
    spec, weights = spec_weights
    vectors = {}
    for runtime in ("onnxruntime", "openvino", "torch"):
        f = Featurizer(spec, weights, runtime=runtime)
        assert (f.runtime, f.precision) == (runtime, "fp32")
        vectors[runtime] = f.featurize(IMAGES, strict=True).vectors
        one = f.featurize(IMAGES[:1], strict=True).vectors  # a lone query takes the latency session
        np.testing.assert_allclose(one[0], vectors[runtime][0], rtol=1e-3, atol=1e-4)
    assert _cos(vectors["openvino"], vectors["onnxruntime"]).min() > 0.9999
    assert _cos(vectors["torch"], vectors["onnxruntime"]).min() > 0.9999


def test_openvino_fixed_shapes_agree_with_the_dynamic_shape(spec_weights, monkeypatch):
    """Each batch size gets a model compiled for its shape, up to STATIC_SHAPES of them, then the
    dynamic one; every one gives the same vectors, called from several threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    from lookalike import runtimes
    from lookalike.featurizer import load_pixels, onnx_model

    spec, weights = spec_weights
    monkeypatch.setattr(runtimes, "STATIC_SHAPES", 3)
    ov = runtimes.OpenVinoRuntime(onnx_model(spec, weights), "fp32", threads=2)
    pixels = np.stack([load_pixels(p, spec) for p in IMAGES[:8]])
    reference = ov.run(pixels)  # batch 8
    sizes = [1, 2, 3, 5, 8, 3, 1]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda n: ov.run(pixels[:n]), sizes))
        alone = list(pool.map(lambda n: ov.run(pixels[:n], alone=True), sizes))
    for n, a, b in zip(sizes, got, alone):
        np.testing.assert_allclose(a, reference[:n], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(b, reference[:n], rtol=1e-3, atol=1e-4)
    fixed = sorted(n for _, n in ov._compiled if n is not None)
    assert len(fixed) == 3 and 8 in fixed  # the first sizes met; the others ran the dynamic shape
    assert (False, None) in ov._compiled and (True, None) in ov._compiled


def test_auto_measures_once_and_remembers(spec_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    spec, weights = spec_weights
    first = Featurizer(spec, weights, runtime="auto")
    choices = json.loads((tmp_path / "cache" / CHOICE_FILE).read_text())
    [(key, choice)] = choices.items()
    assert "|auto|fp32|" in key and (choice["runtime"], choice["precision"]) == (first.runtime, "fp32")
    assert set(choice["images_per_s"]) == {"onnxruntime/fp32", "openvino/fp32"}
    assert choice["images_per_s"][f"{first.runtime}/fp32"] == max(choice["images_per_s"].values())
    # A remembered choice is used as it is: the file is not measured or written again.
    (tmp_path / "cache" / CHOICE_FILE).write_text(json.dumps({key: dict(choice, runtime="openvino")}))
    assert Featurizer(spec, weights, runtime="auto").runtime == "openvino"
    assert json.loads((tmp_path / "cache" / CHOICE_FILE).read_text())[key]["runtime"] == "openvino"


def test_precision_auto_takes_the_fastest_precision_allowed_as_default(spec_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    spec, weights = spec_weights
    f = Featurizer(spec, weights, precision="auto")
    [choice] = json.loads((tmp_path / "cache" / CHOICE_FILE).read_text()).values()
    expected = {"onnxruntime/fp32", "openvino/fp32"} | ({"openvino/bf16"} if native_bf16() else set())
    assert set(choice["images_per_s"]) == expected  # never int8: it is not allowed as a default
    assert f"{f.runtime}/{f.precision}" == max(choice["images_per_s"], key=choice["images_per_s"].get)
    # A named runtime with precision auto chooses among that runtime's precisions only.
    assert Featurizer(spec, weights, runtime="onnxruntime", precision="auto").precision == "fp32"
    assert Featurizer(spec, weights, runtime="torch", precision="auto").runtime == "torch"


def test_a_damaged_choice_file_is_measured_again(spec_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKALIKE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CHOICE_FILE).write_text("{not json")
    spec, weights = spec_weights
    assert Featurizer(spec, weights).runtime in ("onnxruntime", "openvino")
    assert json.loads((tmp_path / "cache" / CHOICE_FILE).read_text())


def with_vnni(monkeypatch) -> None:
    """Let this process take the CPU for one with VNNI, so int8 runs (and overflows, where it has none)."""
    from lookalike import runtimes

    name, flags = runtimes._cpuinfo()
    monkeypatch.setattr(runtimes, "_cpuinfo", lambda: (name, flags | {"avx512_vnni"}))


def without_vnni(monkeypatch) -> None:
    from lookalike import runtimes

    monkeypatch.setattr(runtimes, "_cpuinfo", lambda: ("Some CPU", frozenset({"sse4_2", "avx2", "fma"})))
    monkeypatch.setattr(runtimes.platform, "machine", lambda: "x86_64")


def test_unsupported_choices_are_model_errors(spec_weights, monkeypatch):
    spec, weights = spec_weights
    with pytest.raises(ModelError, match="runtime torch does not run precision int8"):
        Featurizer(spec, weights, runtime="torch", precision="int8")
    with pytest.raises(ModelError, match="unknown runtime 'tensorrt'"):
        Featurizer(spec, weights, runtime="tensorrt")
    with_vnni(monkeypatch)
    with pytest.raises(ModelError, match="needs its quantized model file"):
        Featurizer(spec, weights, precision="int8")


@pytest.fixture(scope="module")
def int8_pair(tmp_path_factory):
    """The same 120 coil-100 photos built in fp32 and in int8 (on a CPU without VNNI too, as if it had it)."""
    root = tmp_path_factory.mktemp("int8")
    rows = [[p.stem, str(p), p.stem.split("__")[0]] for p in sorted(COIL.glob("*.png"))[::10]]
    catalog = write_csv(root / "catalog.csv", ["id", "image", "label"], rows)
    fp32 = VisualSearch.build(catalog, root / "fp32", precision="fp32")
    with pytest.MonkeyPatch.context() as monkeypatch:
        with_vnni(monkeypatch)
        int8 = VisualSearch.build(catalog, root / "int8", precision="int8")
    yield catalog, fp32, int8
    fp32.close()
    int8.close()


def test_int8_index_keeps_its_calibrated_model(int8_pair, monkeypatch):
    catalog, fp32, int8 = int8_pair
    entry = int8.manifest["model"]
    assert entry["precision"] == "int8" and int8.info()["precision"] == "int8"
    assert entry["model_file"]["calibration_images"] == 64  # INT8_CALIBRATION evenly spaced, all readable
    assert (int8.path / entry["model_file"]["name"]).is_file()
    # Reopened, queries run the index's own int8 model: a stored image finds itself.
    with_vnni(monkeypatch)
    with VisualSearch.open(int8.path) as vs:
        queries = [str(p) for p in sorted(COIL.glob("*.png"))[::10][:20]]
        top = [r.hits[0].id for r in vs.search(queries, k=1)]
        assert top == [p.split("/")[-1].rsplit(".", 1)[0] for p in queries]
        assert vs.featurizer.precision == "int8"
        assert vs.doctor(vs.path)["ok"]


@pytest.mark.skipif(int8_saturates(), reason="this CPU has no VNNI: its int8 overflows, and int8 is refused here")
def test_int8_vectors_agree_with_fp32(int8_pair):
    _, fp32, int8 = int8_pair
    cos = _cos(fp32._index.vectors_of(fp32._index.ids), int8._index.vectors_of(int8._index.ids))
    assert cos.mean() > 0.98 and cos.min() > 0.9, (cos.mean(), cos.min())


def test_int8_is_refused_without_vnni_and_an_int8_index_runs_fp32_there(int8_pair, monkeypatch, tmp_path):
    """Without VNNI, int8 products overflow 16 bits: a build in int8 is refused before any work, and
    an int8 index made elsewhere queries with the fp32 model, saying so."""
    catalog, fp32, int8 = int8_pair
    without_vnni(monkeypatch)
    spec, weights = fp32.spec, fp32.featurizer.weights
    with pytest.raises(ModelError, match="precision int8 needs a CPU with VNNI.*Some CPU has none"):
        Featurizer(spec, weights, precision="int8", model_file=int8.path / int8.manifest["model"]["model_file"]["name"])
    with pytest.raises(ModelError, match="precision int8 needs a CPU with VNNI"):
        VisualSearch.build(catalog, tmp_path / "refused", precision="int8")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(ModelError, match="bf16 needs a CPU with native bf16.*; use fp32$"):
        Featurizer(spec, weights, precision="bf16")
    with VisualSearch.open(int8.path) as vs:
        with pytest.warns(UserWarning, match="built in int8, whose arithmetic overflows on this CPU"):
            assert vs.featurizer.precision == "fp32"
        queries = [str(p) for p in sorted(COIL.glob("*.png"))[::10][:20]]
        top = [r.hits[0].id for r in vs.search(queries, k=1)]
        assert sum(t == p.split("/")[-1].rsplit(".", 1)[0] for t, p in zip(top, queries)) >= 18


def test_a_damaged_int8_model_is_found_and_named(int8_pair, tmp_path, monkeypatch):
    import shutil

    with_vnni(monkeypatch)
    _, _, int8 = int8_pair
    copy = tmp_path / "index"
    shutil.copytree(int8.path, copy)
    model = copy / int8.manifest["model"]["model_file"]["name"]
    model.write_bytes(model.read_bytes()[:-100] + b"\0" * 100)
    report = VisualSearch.doctor(copy, repair=True)
    assert not report["ok"] and report["problems"][0]["file"] == model.name
    with VisualSearch.open(copy) as vs:
        assert vs.search(vs._index.vectors_of(vs._index.ids[:1])[0], k=1).hits  # vector queries need no model
        with pytest.raises(ModelError, match="int8 model is missing or damaged"):
            vs.search(str(sorted(COIL.glob("*.png"))[0]), k=1)


@pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16")
def test_bf16_vectors_are_close_to_fp32(spec_weights):
    spec, weights = spec_weights
    ref = Featurizer(spec, weights, runtime="onnxruntime").featurize(IMAGES, strict=True).vectors
    f = Featurizer(spec, weights, precision="bf16")
    assert (f.runtime, f.precision) == ("openvino", "bf16")
    assert _cos(f.featurize(IMAGES, strict=True).vectors, ref).min() > 0.99


def test_bf16_is_refused_without_native_support(spec_weights, monkeypatch):
    from lookalike import runtimes

    monkeypatch.setattr(runtimes, "_cpuinfo", lambda: ("Some CPU", {"avx2"}))
    spec, weights = spec_weights
    with pytest.raises(ModelError, match="bf16 needs a CPU with native bf16.*Some CPU"):
        Featurizer(spec, weights, precision="bf16")


def test_cli_precision_and_runtime(tmp_path):
    catalog = DATA / "coil-6view" / "gallery.csv"
    lookalike = [sys.executable, "-m", "lookalike.cli"]
    bad = subprocess.run(lookalike + ["build", str(catalog), "-o", str(tmp_path / "x"), "--runtime", "torch",
                                      "--precision", "int8"], capture_output=True, text=True)
    assert bad.returncode == 2 and "runtime torch does not run precision int8" in bad.stderr
    assert not (tmp_path / "x").exists()
