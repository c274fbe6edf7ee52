"""The TensorFlow/Keras frontend: a Keras model, a .keras file and a SavedModel directory match Keras's outputs
through kiln. These run only where the extra is installed (pip install kiln[tensorflow]; make test-tensorflow)."""
import importlib.util
import sys

import numpy as np
import pytest
from helpers import assert_close

import kiln
from kiln.cli import main
from kiln.errors import ParseError

HAS_EXTRA = all(importlib.util.find_spec(name) is not None for name in ("tensorflow", "tf2onnx", "keras"))


def needs_extra(test):
    """Marked `tensorflow` (make test-tensorflow selects these) and skipped where the extra is not installed."""
    return pytest.mark.tensorflow(pytest.mark.skipif(not HAS_EXTRA, reason="needs pip install kiln[tensorflow]")(test))


def _keras_cnn():
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(6, 3, activation="relu")(image)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16, activation="swish")(x)
    logits = keras.layers.Dense(5, name="logits")(x)
    model = keras.Model(image, logits)
    batch_norm = model.layers[2]  # non-trivial statistics, so kiln's batch-norm folding is really checked
    rng = np.random.default_rng(1)
    batch_norm.moving_mean.assign(rng.standard_normal(6).astype(np.float32) * 0.1)
    batch_norm.moving_variance.assign(rng.uniform(0.5, 1.5, 6).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def keras_model():
    if not HAS_EXTRA:
        pytest.skip("needs the tensorflow extra")
    return _keras_cnn()


# Keras leaves the batch dimension open, so an engine needs a profile for it (as TensorRT does), in Python or as flags.
PROFILE_FLAGS = ["--minShapes", "image:1x12x12x3", "--optShapes", "image:4x12x12x3", "--maxShapes", "image:8x12x12x3"]


def _config(input_name: str = "image"):
    config = kiln.BuilderConfig()
    config.add_profile({input_name: ((1, 12, 12, 3), (4, 12, 12, 3), (8, 12, 12, 3))})
    return config


def _images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 12, 12, 3)).astype(np.float32)


@needs_extra
def test_keras_model_matches_keras_at_several_batch_sizes(keras_model):
    engine = kiln.build(keras_model, _config())
    assert [b.name for b in engine.inputs] == ["image"] and engine.inputs[0].shape == ("batch", 12, 12, 3)
    assert [b.name for b in engine.outputs] == ["logits"]
    for batch in (1, 4):
        images = _images(batch, seed=batch)
        expected = keras_model(images, training=False).numpy()
        assert_close(engine.run({"image": images})["logits"], expected, rtol=1e-4, atol=1e-5, what=f"batch {batch}")


@needs_extra
def test_keras_file_and_saved_model_build_from_the_command_line(keras_model, tmp_path, capsys):
    keras_file = tmp_path / "cnn.keras"
    keras_model.save(str(keras_file))
    saved_model = tmp_path / "cnn_saved_model"
    keras_model.export(str(saved_model), verbose=False)
    images = _images(3, seed=5)
    expected = keras_model(images, training=False).numpy()
    for source, engine_file, output in ((keras_file, tmp_path / "cnn.kiln", "logits"),
                                        (saved_model, tmp_path / "cnn_saved_model.kiln", "output_0")):
        assert main(["build", str(source), *PROFILE_FLAGS]) == 0, capsys.readouterr().err
        assert "image: float32[batchx12x12x3]" in capsys.readouterr().out
        out = kiln.load(str(engine_file)).run({"image": images})
        assert_close(out[output], expected, rtol=1e-4, atol=1e-5, what=str(source))


@needs_extra
def test_user_names_and_a_damaged_saved_model(keras_model, tmp_path):
    engine = kiln.build(keras_model, _config("pixels"), input_names=["pixels"], output_names=["scores"])
    assert [b.name for b in engine.inputs] == ["pixels"] and [b.name for b in engine.outputs] == ["scores"]
    with pytest.raises(kiln.BuildError) as caught:
        kiln.build(keras_model)  # the open batch dimension needs a profile
    assert caught.value.code == "KILN-E202" and "--minShapes image:1x12x12x3" in caught.value.hint
    with pytest.raises(kiln.BuildError, match="example_inputs"):
        kiln.build(keras_model, example_inputs=(np.zeros((1, 12, 12, 3), np.float32),))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "saved_model.pb").write_bytes(b"not a protobuf")
    with pytest.raises(ParseError) as caught:
        kiln.build(str(damaged))
    assert caught.value.code == "KILN-E104" and "cannot be loaded" in caught.value.message


@needs_extra
def test_an_op_tf2onnx_cannot_convert_is_reported_by_name():
    import keras

    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(3, activation="gelu")(inputs))  # exact GELU: TensorFlow's Erfc op
    with pytest.raises(ParseError) as caught:
        kiln.build(model)
    assert caught.value.code == "KILN-E101" and "Erfc" in caught.value.message


@needs_extra
def test_an_entry_point_may_return_a_keras_model(tmp_path, monkeypatch, capsys):
    (tmp_path / "kiln_keras_models.py").write_text(
        "import keras\n\n"
        "def make_model():\n"
        "    keras.utils.set_random_seed(0)\n"
        "    x = keras.Input((5,), name='x')\n"
        "    return keras.Model(x, keras.layers.Dense(2, activation='sigmoid', name='y')(x))\n")
    monkeypatch.chdir(tmp_path)
    assert main(["build", "kiln_keras_models:make_model", "--minShapes", "x:1x5", "--optShapes", "x:2x5",
                 "--maxShapes", "x:4x5"]) == 0, capsys.readouterr().err
    assert "x: float32[batchx5]" in capsys.readouterr().out
    from kiln_keras_models import make_model

    features = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    out = kiln.load(str(tmp_path / "make_model.kiln")).run({"x": features})["y"]
    assert_close(out, make_model()(features).numpy(), rtol=1e-5, atol=1e-6)


def test_without_the_extra_a_saved_model_gets_the_install_line(tmp_path, monkeypatch):
    saved_model = tmp_path / "exported"
    saved_model.mkdir()
    (saved_model / "saved_model.pb").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # what an interpreter without the extra sees
    with pytest.raises(ParseError) as caught:
        kiln.build(str(saved_model))
    error = caught.value
    assert error.code == "KILN-E108"
    assert "pip install 'kiln[tensorflow]'" in error.hint and "tensorflow-cpu==" in error.hint and "tf2onnx==" in error.hint


def test_on_a_python_without_tensorflow_wheels_the_error_says_so(tmp_path, monkeypatch):
    import tomllib
    from pathlib import Path

    import kiln.frontend.tensorflow as frontend

    saved_model = tmp_path / "exported"
    saved_model.mkdir()
    (saved_model / "saved_model.pb").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # the extra installs nothing on such a Python
    monkeypatch.setattr(frontend, "_python_version", lambda: (3, 14))
    with pytest.raises(ParseError) as caught:
        kiln.build(str(saved_model))
    error = caught.value
    assert error.code == "KILN-E108" and "Python 3.14" in error.message and "no wheels" in error.message
    assert "Python 3.11 to 3.13" in error.hint and "tf2onnx.convert" in error.hint
    monkeypatch.setattr(frontend, "_python_version", lambda: (3, 13))  # a Python with wheels: install the extra
    with pytest.raises(ParseError) as caught:
        kiln.build(str(saved_model))
    assert "no wheels" not in caught.value.message and "pip install 'kiln[tensorflow]'" in caught.value.hint
    # the extra's pins are what the message says: skipped on Python 3.14 and newer, so installing it does not fail there
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    extra = project["project"]["optional-dependencies"]["tensorflow"]
    assert extra == [f"tensorflow-cpu=={frontend.TESTED['tensorflow-cpu']}; python_version < '3.14'",
                     f"tf2onnx=={frontend.TESTED['tf2onnx']}; python_version < '3.14'"]
    assert frontend.NEWEST_PYTHON == (3, 13)


def test_legacy_keras_h5_is_refused_with_the_way_forward(tmp_path, capsys):
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x89HDF")
    assert main(["build", str(path)]) == 1
    err = capsys.readouterr().err
    assert "KILN-E106" in err and ".keras" in err and "model.export" in err
