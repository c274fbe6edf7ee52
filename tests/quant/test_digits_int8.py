"""INT8 post-training quantization of a CNN trained on scikit-learn's digits: accuracy against fp32 per
calibrator, the coverage warning for unrepresentative calibration data, the calibration cache, the
accuracy budget, and the errors a user can cause."""
import json

import numpy as np
import pytest

import kiln
from kiln.errors import KilnError
from quant.digits import batches, config, top1

ALL_INT8 = {"*": "int8"}


@pytest.fixture(scope="module")
def fp32(digits):
    return kiln.build(digits["path"], config())


@pytest.mark.parametrize("calibrator", ["entropy", "percentile"])
def test_int8_top1_within_half_a_point_of_fp32(digits, fp32, calibrator):
    images, labels = digits["val"]
    engine = kiln.build(digits["path"], config(int8=True, calib=batches(digits["calib"][0]), calibrator=calibrator,
                                               layer_precisions=ALL_INT8))
    assert {name: row["precision"] for name, row in engine.plan.layers.items() if row["op"].startswith("kiln::Q")} \
        == {name: "int8" for name in engine.plan.build_info["quantization"]["layers"]}
    assert engine.plan.build_info["counters"]["int8_layers"] == 4  # two convolutions, two linear layers
    reference, got = top1(fp32, images, labels), top1(engine, images, labels)
    assert reference > 95.0  # the model really learned the digits
    assert abs(got - reference) <= 0.5, (calibrator, got, reference)
    # and the int8 logits stay close to fp32's, not just their arg-max
    want = np.concatenate([fp32.run(f)["logits"] for f in batches(images)])
    have = np.concatenate([engine.run(f)["logits"] for f in batches(images)])
    assert np.linalg.norm(have - want) / np.linalg.norm(want) < 0.03


def test_representative_calibration_does_not_warn(digits, kiln_log):
    kiln.build(digits["path"], config(int8=True, calib=batches(digits["calib"][0]), layer_precisions=ALL_INT8,
                                      validation=batches(digits["val"][0])))
    assert not [m for level, m in kiln_log if "does not cover" in m]


@pytest.mark.parametrize("unrepresentative", ["one_class", "inverted"])
def test_unrepresentative_calibration_warns(digits, kiln_log, unrepresentative):
    images, labels = digits["calib"]
    data = images[labels == 3] if unrepresentative == "one_class" else 1.0 - images
    engine = kiln.build(digits["path"], config(int8=True, calib=batches(data), layer_precisions=ALL_INT8,
                                               validation=batches(digits["val"][0])))
    warnings = [m for level, m in kiln_log if level == "WARNING" and "calibration data does not cover the validation range" in m]
    assert warnings
    assert engine.plan.build_info["quantization"]["warnings"] == warnings


def test_calibration_cache_is_written_and_reused_without_data(digits, tmp_path):
    cache = tmp_path / "digits.calib.json"
    first = kiln.build(digits["path"], config(int8=True, calib=batches(digits["calib"][0]), calib_cache=str(cache),
                                              layer_precisions=ALL_INT8))
    record = json.loads(cache.read_text())
    assert record["calibrator"] == "entropy" and "image" in record["tensors"]
    second = kiln.build(digits["path"], config(int8=True, calib_cache=str(cache), layer_precisions=ALL_INT8))
    feed = batches(digits["val"][0])[0]
    np.testing.assert_array_equal(first.run(feed)["logits"], second.run(feed)["logits"])
    # the saved engine keeps its int8 layers
    path = tmp_path / "digits.kiln"
    second.save(str(path))
    loaded = kiln.load(str(path))
    np.testing.assert_array_equal(loaded.run(feed)["logits"], second.run(feed)["logits"])
    assert loaded.plan.layers["/0/Conv"]["precision"] == "int8"


def test_accuracy_budget_keeps_sensitive_layers_in_fp32(digits, fp32):
    images = digits["val"][0][:200]  # each candidate precision set runs over all of them
    engine = kiln.build(digits["path"], config(int8=True, calib=batches(digits["calib"][0]), layer_precisions=ALL_INT8,
                                               validation=batches(images), accuracy_budget=0.005,
                                               accuracy_metric="relerr"))
    quantization = engine.plan.build_info["quantization"]
    rows = quantization["sensitivity"]
    assert len(rows) == 4 and rows == sorted(rows, key=lambda r: -r["sensitivity"])
    assert any(r["precision"] == "fp32" for r in rows) and any(r["precision"] == "int8" for r in rows)
    assert quantization["accuracy"]["error"] <= 0.005
    want = np.concatenate([fp32.run(f)["logits"] for f in batches(images)])
    have = np.concatenate([engine.run(f)["logits"] for f in batches(images)])
    assert np.linalg.norm(have - want) / np.linalg.norm(want) <= 0.005 * 1.01
    fp32_layers = {r["layer"] for r in rows if r["precision"] == "fp32"}
    assert all(engine.plan.layers[name]["precision"] == "fp32" for name in fp32_layers)


def test_unmeetable_accuracy_budget_is_e303_with_the_table(digits):
    with pytest.raises(KilnError) as error:
        kiln.build(digits["path"], config(int8=True, calib=batches(digits["calib"][0]), layer_precisions=ALL_INT8,
                                          validation=batches(digits["val"][0][:100]), accuracy_budget=0.0, accuracy_metric="relerr"))
    assert error.value.code == "KILN-E303"
    assert "sensitivity" in error.value.message and "/6/Gemm" in error.value.message


def test_default_int8_runs_only_where_faster_and_says_why(digits, kiln_log):
    engine = kiln.build(digits["path"], config(int8=True, calib=batches(digits["calib"][0])))
    rows = engine.plan.build_info["quantization"]["layers"]
    for name, row in rows.items():
        assert row["precision"] == ("int8" if row["int8_ms"] < row["fp32_ms"] else "fp32")
        assert engine.plan.layers[name]["precision"] == row["precision"]
    kept = [name for name, row in rows.items() if row["precision"] == "fp32"]
    if kept:
        assert any("keep fp32" in m for level, m in kiln_log if level == "WARNING")


@pytest.mark.parametrize("case", ["no_data", "empty_dir", "wrong_input", "all_zero", "bad_cache"])
def test_unusable_calibration_is_e302(digits, tmp_path, case):
    options = {"no_data": {}, "empty_dir": {"calib": str(tmp_path)},
               "wrong_input": {"calib": [{"pixels": digits["calib"][0][:10]}]},
               "all_zero": {"calib": [{"image": np.zeros((10, 1, 8, 8), np.float32)}]},
               "bad_cache": {"calib_cache": str(tmp_path / "cache.json")}}[case]
    if case == "bad_cache":
        (tmp_path / "cache.json").write_text("{not json")
    with pytest.raises(KilnError) as error:
        kiln.build(digits["path"], config(int8=True, layer_precisions=ALL_INT8, **options))
    assert error.value.code == "KILN-E302" and error.value.hint


def test_bad_options_are_clear_errors(digits):
    with pytest.raises(KilnError) as error:
        kiln.build(digits["path"], config(int8=True, calibrator="kl"))
    assert error.value.code == "KILN-E203" and "entropy" in error.value.hint
    with pytest.raises(KilnError) as error:
        kiln.build(digits["path"], config(int8=True, calib=batches(digits["calib"][0]), layer_precisions={"nope": "int8"}))
    assert error.value.code == "KILN-E203"
    with pytest.raises(KilnError) as error:
        kiln.build(digits["path"], config(int8=True, calib=batches(digits["calib"][0]),
                                          layer_precisions={"/4/MaxPool": "int8"}, precision_constraints="obey"))
    assert error.value.code == "KILN-E301"


def test_calibration_reads_npy_directories_and_generators(digits, tmp_path):
    images = digits["calib"][0][:100]
    for index, feed in enumerate(batches(images)):
        np.save(tmp_path / f"{index}.npy", feed["image"])
    from_files = kiln.build(digits["path"], config(int8=True, calib=str(tmp_path), layer_precisions=ALL_INT8))
    from_generator = kiln.build(digits["path"], config(int8=True, calib=(feed for feed in batches(images)),
                                                       layer_precisions=ALL_INT8))
    feed = batches(digits["val"][0])[0]
    np.testing.assert_array_equal(from_files.run(feed)["logits"], from_generator.run(feed)["logits"])
    assert from_files.plan.config["calib"] == str(tmp_path)
    assert from_generator.plan.config["calib"] == "<python iterable>"
