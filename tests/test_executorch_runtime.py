"""helpers.executorch_runtime: ExecuTorch programs (XNNPACK delegate), float32 and PT2E int8, on real
Fashion-MNIST slices."""

import os

import numpy as np
import pytest
import torch

pytest.importorskip("executorch", reason="ExecuTorch is installed with the book's `deploy` extra")

from helpers import deploy  # noqa: E402
from helpers import executorch_runtime as ET  # noqa: E402
from helpers import quantization as Q  # noqa: E402
from helpers.models import SmallCNN  # noqa: E402
from helpers.training import evaluate, train_centralized  # noqa: E402


@pytest.fixture(scope="module")
def cnn(small_train, small_test):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        return train_centralized(SmallCNN(), small_train, small_test, epochs=1, lr=0.02, momentum=0.9,
                                 seed=0).model.eval()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def programs(cnn, small_train, tmp_path_factory):
    d = tmp_path_factory.mktemp("pte")
    calib = deploy.calibration_images(small_train, torch.arange(1000), 128, seed=0)
    fp32, int8 = d / "fp32.pte", d / "int8.pte"
    return {"fp32": (fp32, ET.export_executorch(cnn, fp32)),
            "int8": (int8, ET.export_executorch(cnn, int8, calibration=calib))}


def test_float32_program_computes_pytorch_s_logits_at_any_batch_up_to_the_bound(cnn, programs, small_test):
    path, size = programs["fp32"]
    assert size == os.path.getsize(path) > 0
    x = small_test.x[:200]
    with torch.no_grad():
        ref = cnn(x).numpy()
    got = ET.executorch_logits(path, x)                      # batches of 64, the last one partial (8)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    predict = ET.executorch_predictor(path)
    assert tuple(predict(x[:1].numpy()).shape) == (1, 10)    # batch 1 ...
    assert tuple(predict(x[:64].numpy()).shape) == (64, 10)  # ... to max_batch
    assert ET.executorch_accuracy(predict, small_test) == pytest.approx(evaluate(cnn, small_test)[1], abs=1e-3)


def test_int8_program_is_smaller_and_keeps_accuracy(cnn, programs, small_test):
    (p32, n32), (p8, n8) = programs["fp32"], programs["int8"]
    assert n8 < 0.45 * n32                                   # int8 weights: well under half the float32 file
    acc32, acc8 = ET.executorch_accuracy(p32, small_test), ET.executorch_accuracy(p8, small_test)
    assert acc32 > 0.6 and abs(acc8 - acc32) < 0.02, (acc32, acc8)
    with torch.no_grad():
        ref = cnn(small_test.x[:64]).numpy()
    got = ET.executorch_logits(p8, small_test.x[:64])
    assert 1e-4 < np.abs(got - ref).max() < 1.0              # quantized: close, but not float32's logits


def test_programs_time_next_to_onnx_runtime(cnn, programs, small_test, tmp_path):
    onnx = tmp_path / "m.onnx"
    deploy.export_onnx(cnn, onnx)
    speed = deploy.measure_speed({"executorch": ET.executorch_predictor(programs["fp32"][0]),
                                  "onnx": deploy.ort_predictor(onnx)}, small_test.x[:64], batch=64, repeats=3)
    assert all(s.latency_s > 0 and s.throughput > 0 for s in speed.values())


def test_export_checks_arguments(cnn, tmp_path):
    with pytest.raises(TypeError):
        ET.export_executorch("not a model", tmp_path / "m.pte")
    with pytest.raises(ValueError, match="lsq_to_float"):
        ET.export_executorch(Q.swap_to_lsq(SmallCNN(), 8), tmp_path / "m.pte")
    with pytest.raises(ValueError, match="calibration"):
        ET.export_executorch(cnn, tmp_path / "m.pte", calibration=torch.zeros(4, 28, 28))
    with pytest.raises(ValueError, match="max_batch"):
        ET.export_executorch(cnn, tmp_path / "m.pte", max_batch=1)
