r"""Deployment with ExecuTorch, PyTorch's on-device runtime (Chapter 5's second runtime).

ExecuTorch runs a program file (``.pte``) made ahead of time from a ``torch.export`` graph: the graph is
lowered to a **delegate** (here XNNPACK, the CPU backend ExecuTorch uses on Android, iOS and desktop), which
takes over every operator it supports. int8 goes through PyTorch 2's export quantization (PT2E): the
``XNNPACKQuantizer`` marks weights (symmetric, one scale per output channel) and activations (affine
uint8-range int8 with a zero point) for quantization, :func:`prepare_pt2e` inserts observers, calibration
images fix the activation ranges, and :func:`convert_pt2e` replaces the observers with
quantize/dequantize pairs that XNNPACK fuses into integer kernels: the same static, calibrated int8 as
:func:`helpers.deploy.quantize_static_int8` produces for ONNX Runtime.

:func:`executorch_predictor` returns a predictor for :func:`helpers.deploy.measure_speed`, so the two
runtimes are timed in one interleaved measurement. ``executorch`` is imported only when a function here is
called (the ``deploy`` extra installs it).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .data import TensorDataset
from .quantization import lsq_layers

__all__ = ["export_executorch", "executorch_predictor", "executorch_logits", "executorch_accuracy"]

Predictor = Callable[[np.ndarray], object]


def _require_executorch():
    try:
        import executorch  # noqa: F401
    except ImportError as exc:                     # pragma: no cover - depends on the installation
        raise ImportError("ExecuTorch is not installed: pip install executorch (the book's `deploy` extra "
                          "installs the pinned version)") from exc


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the export stack's informational logging (torch.export, torchao, ExecuTorch) while exporting."""
    loggers = [logging.getLogger(n) for n in ("torch", "torchao", "executorch", "torch._export", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_executorch(model: nn.Module, path: str | os.PathLike, *, input_shape: Sequence[int] = (1, 28, 28),
                      calibration: torch.Tensor | None = None, max_batch: int = 64) -> int:
    """Write ``model`` (eval mode, on a copy) to ``path`` as an ExecuTorch program lowered to XNNPACK, with a
    dynamic batch axis of size 1..``max_batch``; return the file size in bytes.

    Without ``calibration`` the program computes in float32. With ``calibration`` (N, *input_shape) images it
    is static int8 via PT2E: weights :math:`q = \mathrm{round}(w/s)` with one symmetric scale :math:`s` per
    output channel, activations :math:`r = s_a (q_a - z_a)` with ranges observed on the calibration images.
    """
    _require_executorch()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if lsq_layers(model):
        raise ValueError("model has LSQ layers: convert it with helpers.deploy.lsq_to_float(model) first")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 2:
        raise ValueError(f"max_batch must be an int ≥ 2, got {max_batch!r}")
    if calibration is not None:
        if not isinstance(calibration, torch.Tensor) or tuple(calibration.shape[1:]) != tuple(input_shape) \
                or len(calibration) == 0:
            raise ValueError(f"calibration must be a non-empty tensor of shape (N, {', '.join(map(str, input_shape))})")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    net = copy.deepcopy(model).eval()
    example = (torch.zeros(max_batch, *input_shape),)   # at the bound: the planner sizes buffers from it
    dynamic = ({0: torch.export.Dim("batch", min=1, max=max_batch)},)
    with _quiet(), torch.no_grad():
        if calibration is not None:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer, get_symmetric_quantization_config)
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            graph = torch.export.export(net, example, dynamic_shapes=dynamic).module()
            observed = prepare_pt2e(graph, quantizer)
            for start in range(0, len(calibration), 64):
                observed(calibration[start:start + 64].float())
            net = convert_pt2e(observed)
        exported = torch.export.export(net, example, dynamic_shapes=dynamic)
        program = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(program.buffer)
    return os.path.getsize(path)


def executorch_predictor(path: str | os.PathLike) -> Predictor:
    """The program at ``path``, loaded once into ExecuTorch's runtime, as a predictor: NumPy images in,
    logits out (a torch tensor)."""
    _require_executorch()
    from executorch.runtime import Runtime

    with open(os.fspath(path), "rb") as f:
        data = f.read()
    program = Runtime.get().load_program(data)     # the runtime reads from ``data``: it must stay alive
    method = program.load_method("forward")
    keep_alive = (data, program)

    def predict(x: np.ndarray) -> torch.Tensor:
        assert keep_alive
        return method.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])[0]

    return predict


def executorch_logits(path_or_predictor, x: torch.Tensor | np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits of the program (a path or a predictor) on ``x``, in batches of at most ``batch_size``."""
    predict = path_or_predictor if callable(path_or_predictor) else executorch_predictor(path_or_predictor)
    arr = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return np.concatenate([np.asarray(predict(arr[i:i + batch_size])) for i in range(0, len(arr), batch_size)])


def executorch_accuracy(path_or_predictor, data: TensorDataset, batch_size: int = 64) -> float:
    """Top-1 accuracy of the program on ``data``."""
    logits = executorch_logits(path_or_predictor, data.x, batch_size)
    return float((torch.from_numpy(logits).argmax(1) == data.y).float().mean())
