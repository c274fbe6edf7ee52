"""`kiln build --int8` from the command line: .npz calibration directory, cache reuse, budget table, errors."""
import numpy as np

from kiln.cli import main
from quant.digits import batches

SHAPES = ["--minShapes", "image:1x1x8x8", "--optShapes", "image:50x1x8x8", "--maxShapes", "image:64x1x8x8"]


def _save(feeds, folder):
    folder.mkdir()
    for index, feed in enumerate(feeds):
        np.savez(folder / f"{index:03d}.npz", **feed)
    return str(folder)


def test_build_int8_with_calibration_directory_and_cache(digits, tmp_path, capsys):
    calib = _save(batches(digits["calib"][0][:100]), tmp_path / "calib")
    val = _save(batches(digits["val"][0][:100]), tmp_path / "val")
    cache, engine = str(tmp_path / "calib.cache"), str(tmp_path / "d.kiln")
    common = [digits["path"], *SHAPES, "--int8", "--saveEngine", engine, "--layerPrecisions", "*:int8"]
    assert main(["build", *common, "--calib", calib, "--calibCache", cache, "--calibrator", "percentile"]) == 0
    out = capsys.readouterr().out
    assert "4 of 4 quantizable layers in int8 (percentile calibrator)" in out
    # the cache stands in for the data; the accuracy budget prints its sensitivity table
    assert main(["build", *common, "--calibCache", cache, "--validation", val, "--accuracyBudget", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "sensitivity (points top-1)" in out and "/0/Conv" in out
    import kiln

    assert kiln.load(engine).plan.layers["/2/Conv"]["precision"] == "int8"


def test_build_int8_errors_exit_1_with_the_code(digits, tmp_path, capsys):
    assert main(["build", digits["path"], *SHAPES, "--int8", "--saveEngine", str(tmp_path / "x.kiln")]) == 1
    assert "KILN-E302" in capsys.readouterr().err
    assert main(["build", digits["path"], *SHAPES, "--int8", "--calib", str(tmp_path), "--layerPrecisions", "conv:fp16"]) == 1
    assert "KILN-E301" in capsys.readouterr().err
