r"""Deployment with ONNX Runtime (CPU): export, int8 quantization, and honest measurements (Chapter 5).

A trained PyTorch model leaves the training loop as an ONNX file (:func:`export_onnx`) and runs in
ONNX Runtime. Three ways to make that file int8:

* **dynamic** (:func:`quantize_dynamic_int8`): int8 weights; each activation tensor is quantized at
  run time from its own min/max, so no calibration data is needed;
* **static, calibrated** (:func:`quantize_static_int8`): int8 weights and int8 activations whose
  scales are fixed in advance from calibration images (one client's own training data, never the
  test set), stored in QDQ format (``QuantizeLinear``/``DequantizeLinear`` pairs that the runtime
  fuses into integer kernels);
* **static with the learned step** (:func:`quantize_learned_scale_int8`): as above, but every weight's
  scale is the step :math:`\Delta` that federated QAT learned (:class:`helpers.quantization.LSQQuantizer`),
  and its int8 codes are exactly the QAT codes :math:`q = \mathrm{round}(\mathrm{clip}(w/\Delta, -Q, Q))`.

ONNX Runtime's int8 arithmetic is affine, :math:`r = s\,(q - z)`: weights are symmetric (:math:`z = 0`),
activations use ``uint8`` with a zero point. Measurements (:func:`onnx_accuracy`, :func:`measure_speed`)
run with one intra-op and one inter-op thread; speed is the median of interleaved repeats.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .data import TensorDataset
from .quantization import LSQConv2d, lsq_layers

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "OPSET",
    "export_onnx",
    "export_identity_onnx",
    "lsq_to_float",
    "session",
    "onnx_logits",
    "onnx_accuracy",
    "calibration_images",
    "ArrayCalibrationReader",
    "quantize_dynamic_int8",
    "quantize_static_int8",
    "quantize_learned_scale_int8",
    "qdq_weights",
    "op_counts",
    "torch_predictor",
    "ort_predictor",
    "Speed",
    "measure_speed",
    "op_profile",
]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17

Predictor = Callable[[np.ndarray], object]


def _check_path(path: str | os.PathLike, name: str) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a file path, got {type(path).__name__}")
    return os.fspath(path)


# ---- export -----------------------------------------------------------------------------------

def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_shape: Sequence[int] = (1, 28, 28),
                opset: int = OPSET) -> int:
    """Write ``model`` (in eval mode, on a copy) to ``path`` as ONNX with a dynamic batch axis; return the
    file size in bytes (``os.path.getsize``).

    Uses the TorchScript-based exporter (``dynamo=False``): it needs nothing beyond ``torch`` and ``onnx``
    and runs offline, while the newer ``torch.export``-based exporter needs the extra ``onnxscript``
    package. PyTorch marks the TorchScript exporter as deprecated; its two deprecation warnings are
    silenced here (nothing else is).
    The graph has one input ``"input"`` (N, *input_shape) float32 and one output ``"logits"``.
    """
    path = _check_path(path, "path")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if lsq_layers(model):
        raise ValueError("model has LSQ layers: convert it with lsq_to_float(model) first (the exported graph "
                         "should hold the fake-quantized weights, not the fake-quantizer)")
    net = copy.deepcopy(model).eval()
    dummy = torch.zeros(1, *input_shape)
    with warnings.catch_warnings():
        for message in (".*legacy TorchScript-based ONNX export", "The feature will be removed"):
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        torch.onnx.export(net, (dummy,), path, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], do_constant_folding=True,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    return os.path.getsize(path)


def export_identity_onnx(path: str | os.PathLike, *, input_shape: Sequence[int] = (1, 28, 28),
                         opset: int = OPSET) -> int:
    """Write an ONNX graph that does nothing: one ``Identity`` node from ``"input"`` (N, *input_shape) to
    ``"logits"``. Timed like a model, its latency is the runtime's fixed cost per call (binding the input,
    launching the graph, returning the output), the floor under every model's batch-1 latency."""
    import onnx
    from onnx import TensorProto, helper

    path = _check_path(path, "path")
    shape = ["batch", *input_shape]
    graph = helper.make_graph([helper.make_node("Identity", [INPUT_NAME], [OUTPUT_NAME])], "identity",
                              [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return os.path.getsize(path)


@torch.no_grad()
def lsq_to_float(model: nn.Module) -> nn.Module:
    r"""A copy of an LSQ model (:func:`helpers.quantization.swap_to_lsq`) with every LSQ layer replaced by
    a plain ``nn.Linear``/``nn.Conv2d`` holding the fake-quantized weight :math:`q\,\Delta`: the float
    model QAT evaluated, ready for :func:`export_onnx`."""
    out = copy.deepcopy(model)
    for name, layer in lsq_layers(out).items():
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        if isinstance(layer, LSQConv2d):
            plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        plain.weight.copy_(layer.wq(layer.weight))
        if layer.bias is not None:
            plain.bias.copy_(layer.bias)
        setattr(parent, child, plain)
    return out


# ---- running and scoring ----------------------------------------------------------------------

def session(path: str | os.PathLike, threads: int = 1):
    """An ``onnxruntime.InferenceSession`` on the CPU with ``threads`` intra-op threads and 1 inter-op thread
    (sequential execution), all graph optimizations on (the default)."""
    import onnxruntime as ort

    path = _check_path(path, "path")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an int ≥ 1, got {threads!r}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _as_session(model_or_path):
    return session(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path


def onnx_logits(model_or_path, x: torch.Tensor | np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """The logits ONNX Runtime computes for images ``x`` (N, C, H, W), in batches of ``batch_size``."""
    sess = _as_session(model_or_path)
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    return np.concatenate([sess.run(None, {INPUT_NAME: x[s:s + batch_size]})[0] for s in range(0, len(x), batch_size)])


def onnx_accuracy(model_or_path, data: TensorDataset, batch_size: int = 1000) -> float:
    """Accuracy of the ONNX model (a path or a session) on ``data``, computed by ONNX Runtime."""
    if len(data) == 0:
        raise ValueError("data is empty")
    pred = onnx_logits(model_or_path, data.x, batch_size).argmax(1)
    return float((pred == data.y.numpy()).mean())


# ---- quantization -----------------------------------------------------------------------------

def calibration_images(data: TensorDataset, client_indices: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """``size`` images drawn without replacement (seeded) from **one client's own** training indices.

    Static quantization fixes activation ranges from these images; taking them from a client's data
    is what a deployment can do. Using the test set would fit the deployed model to the data that is
    supposed to judge it."""
    idx = torch.as_tensor(client_indices, dtype=torch.long)
    if idx.dim() != 1 or len(idx) == 0:
        raise ValueError("client_indices must be a non-empty 1-D index tensor")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= len(idx):
        raise ValueError(f"size must be an int in [1, {len(idx)}], got {size!r}")
    gen = torch.Generator().manual_seed(seed)
    return data.x[idx[torch.randperm(len(idx), generator=gen)[:size]]].clone()


class ArrayCalibrationReader:
    """Feeds in-memory calibration images to ONNX Runtime's calibrator, ``batch_size`` at a time.

    It is an ``onnxruntime.quantization.CalibrationDataReader`` by duck typing (that class accepts any
    object with a ``get_next`` method), so importing this module does not import ONNX Runtime."""

    def __init__(self, images: torch.Tensor | np.ndarray, batch_size: int = 64) -> None:
        x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if x.ndim < 2 or len(x) == 0:
            raise ValueError("calibration images must be a non-empty batch (N, ...)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int ≥ 1, got {batch_size!r}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.batches = [x[s:s + batch_size] for s in range(0, len(x), batch_size)]
        self._it: Iterator[np.ndarray] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next batch as ``{"input": array}``, or ``None`` when all were read."""
        batch = next(self._it, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        """Start again from the first batch."""
        self._it = iter(self.batches)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice through the root logger (e.g. "Please consider to run
    pre-processing"); the chapter discusses pre-processing itself, so silence it while quantizing."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_dynamic_int8(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Dynamic int8 quantization (weights int8, activations quantized at run time); returns ``dst``'s size."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = _check_path(src, "src"), _check_path(dst, "dst")
    with _quiet_quantizer():
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    return os.path.getsize(dst)


def quantize_static_int8(src: str | os.PathLike, dst: str | os.PathLike, calibration: torch.Tensor | np.ndarray, *,
                         per_channel: bool = True, preprocess: bool = False, op_types: Sequence[str] | None = None,
                         extra_options: Mapping | None = None) -> int:
    """Static int8 quantization in QDQ format (uint8 activations, int8 symmetric weights), activation
    ranges from min/max over ``calibration``; returns ``dst``'s size in bytes.

    ``per_channel``: one weight scale per output channel (else one per tensor). ``preprocess``: run ONNX
    Runtime's ``quant_pre_process`` (shape inference and graph optimization) first. ``op_types``: quantize
    only these operator types (e.g. ``["Gemm"]``); the others stay float32.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = _check_path(src, "src"), _check_path(dst, "dst")
    with tempfile.TemporaryDirectory() as tmp, _quiet_quantizer():
        if preprocess:
            pre = os.path.join(tmp, "preprocessed.onnx")
            quant_pre_process(src, pre)
            src = pre
        quantize_static(src, dst, ArrayCalibrationReader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(op_types) if op_types is not None else None,
                        extra_options=dict(extra_options or {}))
    return os.path.getsize(dst)


def qdq_weights(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{float weight name: (int8 codes, scales)}`` for every weight a QDQ model dequantizes from an
    int8 initializer (the scales have one entry per output channel, or one)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(_check_path(path, "path"))
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        codes = numpy_helper.to_array(inits[node.input[0]])
        if codes.dtype != np.int8:
            continue       # int32 biases
        name = node.input[0].removesuffix("_quantized")
        out[name] = (codes, numpy_helper.to_array(inits[node.input[1]]).reshape(-1))
    return out


def quantize_learned_scale_int8(lsq_model: nn.Module, dst: str | os.PathLike,
                                calibration: torch.Tensor | np.ndarray, *,
                                input_shape: Sequence[int] = (1, 28, 28)) -> int:
    r"""Static int8 (QDQ) model whose weight scales are the steps :math:`\Delta` learned by federated QAT.

    ``lsq_model`` holds :class:`~helpers.quantization.LSQLinear`/:class:`~helpers.quantization.LSQConv2d`
    layers of at most 8 bits. Its fake-quantized float version (:func:`lsq_to_float`) is exported, and
    ONNX Runtime's static quantizer is told, through ``TensorQuantOverrides``, to use scale :math:`\Delta`
    and zero point 0 for each weight (per channel if the LSQ steps are per channel). The weights already
    lie on the grid :math:`q\Delta`, so the stored codes are exactly the QAT codes. Activation scales
    come from ``calibration``; the quantizer's automatic enlargement of weight scales for int32 biases is
    switched off, so nothing changes :math:`\Delta`. The result is checked before returning: every
    weight's stored scale equals :math:`\Delta` bit for bit and its codes equal the QAT codes.
    Returns ``dst``'s size in bytes.
    """
    layers = lsq_layers(lsq_model)
    if not layers:
        raise ValueError("lsq_model has no LSQ layers (build it with helpers.quantization.swap_to_lsq)")
    if any(layer.wq.bits > 8 for layer in layers.values()):
        raise ValueError("LSQ layers wider than 8 bits do not fit int8 codes")
    per_channel = {layer.wq.per_channel for layer in layers.values()}
    if len(per_channel) != 1:
        raise ValueError("all LSQ layers must use the same step layout (all per channel or all per tensor)")
    per_channel = per_channel.pop()
    overrides, expected = {}, {}
    for name, layer in layers.items():
        step = layer.wq.step.detach().to(torch.float32).reshape(-1).numpy()
        codes = layer.wq.codes(layer.weight).to(torch.int8).numpy()
        key = f"{name}.weight"
        expected[key] = (codes, step)
        if per_channel:
            overrides[key] = [{"axis": 0, "scale": np.float32(s), "zero_point": np.int8(0)} for s in step]
        else:
            overrides[key] = [{"scale": np.float32(step[0]), "zero_point": np.int8(0)}]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "fake_quant_fp32.onnx")
        export_onnx(lsq_to_float(lsq_model), src, input_shape=input_shape)
        size = quantize_static_int8(src, dst, calibration, per_channel=per_channel,
                                    extra_options={"TensorQuantOverrides": overrides,
                                                   "QDQDisableWeightAdjustForInt32Bias": True})
    stored = qdq_weights(dst)
    for key, (codes, step) in expected.items():
        if key not in stored:
            raise RuntimeError(f"the quantized model has no int8 weight {key!r}")
        got_codes, got_step = stored[key]
        if not np.array_equal(got_step.astype(np.float32), step) or not np.array_equal(got_codes, codes):
            raise RuntimeError(f"{key}: the stored int8 weight does not use the learned step exactly")
    return size


def op_counts(path: str | os.PathLike) -> dict[str, int]:
    """How many nodes of each operator type the ONNX file holds (before ONNX Runtime's fusions)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(_check_path(path, "path")).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ---- speed ------------------------------------------------------------------------------------

def torch_predictor(model: nn.Module) -> Predictor:
    """PyTorch eager inference as a predictor: NumPy images in, logits out (eval mode, no autograd)."""
    net = copy.deepcopy(model).eval()

    def predict(x: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return net(torch.from_numpy(x))

    return predict


def ort_predictor(path: str | os.PathLike, threads: int = 1) -> Predictor:
    """ONNX Runtime inference of the file at ``path`` as a predictor (a session made once)."""
    sess = session(path, threads)
    out_name = sess.get_outputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return sess.run([out_name], {INPUT_NAME: x})[0]

    return predict


@dataclass
class Speed:
    """Median speed of one predictor: seconds per image at batch 1 (with the quartiles of the repeats),
    images per second at batch ``batch``."""

    latency_s: float
    throughput: float
    batch: int
    latency_q1_s: float = float("nan")
    latency_q3_s: float = float("nan")

    @property
    def latency_ms(self) -> float:
        return 1e3 * self.latency_s

    @property
    def latency_us(self) -> float:
        return 1e6 * self.latency_s


_CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def _calls_for(fn: Callable[[], object], target_s: float, clock: Callable[[], float]) -> int:
    """How many calls of ``fn`` take about ``target_s`` seconds (at least 1)."""
    fn()                                   # warm-up (first-run allocations)
    t0 = clock()
    fn()
    one = max(clock() - t0, 1e-7)
    return max(1, int(target_s / one))


def measure_speed(predictors: Mapping[str, Predictor], images: torch.Tensor | np.ndarray, *, batch: int = 64,
                  repeats: int = 21, target_s: float = 0.005, clock: str = "cpu") -> dict[str, Speed]:
    """Latency at batch 1 (median and quartiles) and throughput at batch ``batch`` of every predictor, as
    medians over ``repeats`` **interleaved** rounds: each round times every (predictor, batch size) once, in a rotated
    order, so a burst of load on a shared machine hits all of them alike. Each timing runs about
    ``target_s`` seconds of calls.

    ``clock="cpu"`` (the default) times the calling thread's CPU time (``time.thread_time``). With one
    thread the whole inference runs on the calling thread (PyTorch is set to 1 thread during the
    measurement; :func:`ort_predictor` sessions use 1 intra-op thread), so on a dedicated core this is the
    wall-clock latency, and on a shared machine it leaves out the time spent waiting for a core.
    ``clock="wall"`` uses ``time.perf_counter``; use it for predictors that run on several threads (the
    CPU-time clock sees only the calling thread). Compare predictors only by ratios of medians measured
    together in one call.
    """
    if not predictors:
        raise ValueError("give at least one predictor")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int ≥ 1, got {repeats!r}")
    if clock not in _CLOCKS:
        raise ValueError(f"clock must be one of {sorted(_CLOCKS)}, got {clock!r}")
    timer = _CLOCKS[clock]
    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= len(x):
        raise ValueError(f"batch must be an int in [1, {len(x)}] (the number of images given), got {batch!r}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    one, many = x[:1].copy(), x[:batch].copy()
    names = list(predictors)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        jobs = {(n, b): (lambda f=predictors[n], a=(one if b == 1 else many): f(a)) for n in names for b in (1, batch)}
        calls = {k: _calls_for(fn, target_s, timer) for k, fn in jobs.items()}
        times: dict[tuple[str, int], list[float]] = {k: [] for k in jobs}
        keys = list(jobs)
        for r in range(repeats):
            shift = r % len(keys)
            for k in keys[shift:] + keys[:shift]:
                fn, n = jobs[k], calls[k]
                t0 = timer()
                for _ in range(n):
                    fn()
                times[k].append((timer() - t0) / n)
    finally:
        torch.set_num_threads(threads)
    def quartiles(v: list[float]) -> tuple[float, float]:
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
        return q[0], q[2]

    return {n: Speed(latency_s=statistics.median(times[n, 1]), throughput=batch / statistics.median(times[n, batch]),
                     batch=batch, latency_q1_s=quartiles(times[n, 1])[0], latency_q3_s=quartiles(times[n, 1])[1])
            for n in names}


def op_profile(path: str | os.PathLike, images: torch.Tensor | np.ndarray, runs: int = 30) -> dict[str, float]:
    """Microseconds per run spent in each node *after* ONNX Runtime's graph optimizations (its own
    profiler, 1 thread), keyed ``"OpType  node name"``, largest first: which operators the time goes to."""
    import json

    import onnxruntime as ort

    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    x = np.ascontiguousarray(x, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        sess = ort.InferenceSession(_check_path(path, "path"), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, {INPUT_NAME: x})
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    total: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            key = f"{e['args']['op_name']}  {e['name'][:-len('_kernel_time')]}"
            total[key] = total.get(key, 0.0) + e["dur"] / runs
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))
