r"""Chapter 5's int8 variants over seeds (the section ``05_deployment_int8_seeds``): one seed trains the pipeline's
final architecture with FedAvg, exports it to ONNX and quantizes it every way the chapter does, as a task for
:func:`helpers.parallel.run_parallel` (one seed = partition + initialisation + sampling + calibration draw)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Sequence

import numpy as np
import torch

from ..data import TensorDataset, label_histogram
from ..deploy import (calibration_images, export_onnx, onnx_accuracy, quantize_dynamic_int8,
                      quantize_static_int8)
from ..federated import FedConfig, run_federated
from ..models import SmallCNN
from ..reproducibility import seed_everything

__all__ = ["FINAL_CNN", "INT8_VARIANTS", "farthest_client", "int8_variants_task"]

#: The pipeline's final architecture in Chapter 5: the student (8/16 channels, 32 hidden units) with half of its
#: channels and hidden units pruned away.
FINAL_CNN = dict(channels=(4, 8), hidden=16)

#: The int8 files each seed makes from its float32 ONNX model, as (label, how it is made). Every static model is
#: calibrated on 256 images of client 0 unless its label says otherwise.
INT8_VARIANTS = {
    "dynamic": "weights int8, activations quantized at run time",
    "static, per-channel": "per-channel weight scales (the chapter's default)",
    "static, per-tensor": "one weight scale per tensor",
    "static, pre-processed": "quant_pre_process before quantizing",
    "static, Gemm only": "convolutions left in float32",
    "static, calibrated on test images": "256 test images (the leak)",
    "static, calibrated on the farthest client": "256 images of the client whose labels differ most from client 0's",
}


def farthest_client(labels: torch.Tensor, partition: Sequence[torch.Tensor], num_classes: int, to: int = 0) -> int:
    r"""The client whose label distribution is farthest from client ``to``'s in total variation,
    :math:`\tfrac12 \sum_c |p_k(c) - p_{to}(c)|`."""
    hist = label_histogram(labels, list(partition), num_classes).astype(float)
    p = hist / hist.sum(axis=1, keepdims=True)
    tv = 0.5 * np.abs(p - p[to]).sum(axis=1)
    return int(np.argmax(tv))


def int8_variants_task(*, seed: int, train: TensorDataset, test: TensorDataset, partition: Sequence[torch.Tensor],
                       config: FedConfig, calib_size: int = 256) -> dict:
    """Train :data:`FINAL_CNN` with FedAvg (``config``, seed ``seed``), export it to ONNX and make every
    :data:`INT8_VARIANTS` file from it; return the test ``acc`` of each (and of ``"float32"``), each file's
    ``bytes`` and the ``far_client`` used."""
    seed_everything(seed)
    run = run_federated(SmallCNN(**FINAL_CNN), train, partition, test, dataclasses.replace(config, seed=seed))
    far = farthest_client(train.y, partition, train.num_classes)
    calib = calibration_images(train, partition[0], calib_size, seed=seed)
    calib_far = calibration_images(train, partition[far], min(calib_size, len(partition[far])), seed=seed)
    calib_test = test.x[torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:calib_size]]
    with tempfile.TemporaryDirectory() as tmp:
        def path(name: str) -> str:
            return os.path.join(tmp, name.replace(" ", "_").replace(",", "") + ".onnx")

        nbytes = {"float32": export_onnx(run.model, path("float32"))}
        src = path("float32")
        nbytes["dynamic"] = quantize_dynamic_int8(src, path("dynamic"))
        nbytes["static, per-channel"] = quantize_static_int8(src, path("static, per-channel"), calib)
        nbytes["static, per-tensor"] = quantize_static_int8(src, path("static, per-tensor"), calib, per_channel=False)
        nbytes["static, pre-processed"] = quantize_static_int8(src, path("static, pre-processed"), calib,
                                                               preprocess=True)
        nbytes["static, Gemm only"] = quantize_static_int8(src, path("static, Gemm only"), calib, op_types=["Gemm"])
        nbytes["static, calibrated on test images"] = quantize_static_int8(
            src, path("static, calibrated on test images"), calib_test)
        nbytes["static, calibrated on the farthest client"] = quantize_static_int8(
            src, path("static, calibrated on the farthest client"), calib_far)
        acc = {name: onnx_accuracy(path(name), test) for name in nbytes}
    return {"acc": acc, "bytes": nbytes, "far_client": far, "torch_acc": run.history.final_accuracy}
