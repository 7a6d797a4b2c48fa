"""helpers.deploy: ONNX export, ONNX Runtime int8 quantization and measurements, on real Fashion-MNIST slices."""

import copy
import os

import numpy as np
import pytest
import torch

from helpers import deploy, pruning
from helpers import quantization as Q
from helpers.experiment import book_config
from helpers.federated import run_federated
from helpers.models import MLP, SmallCNN, count_parameters
from helpers.training import evaluate, train_centralized


@pytest.fixture(scope="module")
def trained(small_train, small_test):
    """An MLP and a SmallCNN trained for one epoch on the 6,000-image slice (seeded, 1 thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        out = {}
        for name, model in {"mlp": MLP(hidden=(64,)), "cnn": SmallCNN()}.items():
            out[name] = train_centralized(model, small_train, small_test, epochs=1, lr=0.02, momentum=0.9,
                                          seed=0).model.eval()
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def calib(small_train):
    return deploy.calibration_images(small_train, torch.arange(1000), 128, seed=0)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_export_round_trip_matches_pytorch(trained, small_test, tmp_path, name):
    model = trained[name]
    path = tmp_path / f"{name}.onnx"
    size = deploy.export_onnx(model, path)
    assert size == os.path.getsize(path) > 0
    x = small_test.x[:300]
    with torch.no_grad():
        ref = model(x).numpy()
    got = deploy.onnx_logits(path, x, batch_size=128)        # several batches, the last one partial
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert deploy.onnx_logits(path, x[:1]).shape == (1, 10)  # the batch axis is dynamic
    assert deploy.onnx_accuracy(path, small_test) == pytest.approx(evaluate(model, small_test)[1], abs=1e-3)


def test_export_checks_arguments(trained, tmp_path):
    with pytest.raises(TypeError):
        deploy.export_onnx("not a model", tmp_path / "m.onnx")
    with pytest.raises(TypeError):
        deploy.export_onnx(trained["mlp"], 3)
    with pytest.raises(ValueError, match="lsq_to_float"):
        deploy.export_onnx(Q.swap_to_lsq(trained["mlp"], 8), tmp_path / "m.onnx")


def test_lsq_to_float_computes_the_fake_quantized_model(trained, small_test):
    lsq = Q.swap_to_lsq(trained["cnn"], 4, per_channel=True)
    plain = deploy.lsq_to_float(lsq)
    assert not Q.lsq_layers(plain) and Q.lsq_layers(lsq)        # the LSQ model itself is untouched
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(small_test.x[:200]), lsq.eval()(small_test.x[:200]))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_int8_models_are_smaller_and_keep_accuracy(trained, small_test, calib, tmp_path, name):
    fp32 = tmp_path / "fp32.onnx"
    size32 = deploy.export_onnx(trained[name], fp32)
    acc32 = deploy.onnx_accuracy(fp32, small_test)
    sizes = {
        "dynamic": deploy.quantize_dynamic_int8(fp32, tmp_path / "dyn.onnx"),
        "static": deploy.quantize_static_int8(fp32, tmp_path / "static.onnx", calib),
        "static per tensor": deploy.quantize_static_int8(fp32, tmp_path / "static_pt.onnx", calib, per_channel=False),
    }
    for kind, size in sizes.items():
        path = tmp_path / {"dynamic": "dyn.onnx", "static": "static.onnx", "static per tensor": "static_pt.onnx"}[kind]
        assert size == os.path.getsize(path)
        assert size * 3 < size32, (kind, size, size32)                      # int8 weights: about 4x fewer bytes
        assert abs(deploy.onnx_accuracy(path, small_test) - acc32) <= 0.02, kind
    counts = deploy.op_counts(tmp_path / "static.onnx")
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0       # QDQ format
    assert all(c.dtype == np.int8 for c, _ in deploy.qdq_weights(tmp_path / "static.onnx").values())


def test_static_quantization_can_leave_operators_in_float(trained, calib, tmp_path):
    fp32 = tmp_path / "fp32.onnx"
    deploy.export_onnx(trained["cnn"], fp32)
    deploy.quantize_static_int8(fp32, tmp_path / "gemm.onnx", calib, op_types=["Gemm"])
    stored = deploy.qdq_weights(tmp_path / "gemm.onnx")
    assert set(stored) == {"classifier.0.weight", "classifier.2.weight"}      # the convolutions stay float32


@pytest.mark.parametrize("bits,per_channel", [(8, True), (8, False), (4, True)])
def test_learned_scale_int8_uses_exactly_the_learned_steps(trained, small_test, calib, tmp_path, bits, per_channel):
    lsq = Q.swap_to_lsq(trained["cnn"], bits, per_channel=per_channel)
    with torch.no_grad():                          # steps that differ from any max-abs rule the runtime could pick
        for layer in Q.lsq_layers(lsq).values():
            layer.wq.step.mul_(torch.linspace(0.8, 1.3, layer.wq.step.numel()))
    path = tmp_path / "learned.onnx"
    size = deploy.quantize_learned_scale_int8(lsq, path, calib)
    assert size == os.path.getsize(path)
    stored = deploy.qdq_weights(path)
    layers = Q.lsq_layers(lsq)
    assert set(stored) == {f"{n}.weight" for n in layers}
    for name, layer in layers.items():
        codes, scale = stored[f"{name}.weight"]
        step = layer.wq.step.detach().reshape(-1).numpy()
        assert scale.dtype == np.float32 and np.array_equal(scale, step)                       # Δ, bit for bit
        assert np.array_equal(codes, layer.wq.codes(layer.weight).numpy().astype(np.int8))     # the QAT codes
        assert np.abs(codes).max() <= Q.qmax(bits)
    acc_torch = evaluate(lsq, small_test)[1]
    assert abs(deploy.onnx_accuracy(path, small_test) - acc_torch) <= 0.02   # only the activations are rounded


def test_learned_scale_int8_rejects_what_it_cannot_deploy(trained, calib, tmp_path):
    with pytest.raises(ValueError, match="no LSQ layers"):
        deploy.quantize_learned_scale_int8(trained["mlp"], tmp_path / "x.onnx", calib)
    with pytest.raises(ValueError, match="8 bits"):
        deploy.quantize_learned_scale_int8(Q.swap_to_lsq(trained["mlp"], 16), tmp_path / "x.onnx", calib)
    mixed = Q.swap_to_lsq(trained["mlp"], 8, per_channel=True)
    mixed.net[1] = Q.LSQLinear(trained["mlp"].net[1], 8, per_channel=False)
    with pytest.raises(ValueError, match="same step layout"):
        deploy.quantize_learned_scale_int8(mixed, tmp_path / "x.onnx", calib)


def test_calibration_images_come_from_the_client_only(small_train):
    client = torch.arange(100, 400)
    a = deploy.calibration_images(small_train, client, 50, seed=3)
    b = deploy.calibration_images(small_train, client, 50, seed=3)
    assert a.shape == (50, 1, 28, 28) and torch.equal(a, b)
    allowed = small_train.x[client].reshape(1, len(client), -1)
    assert bool((allowed == a.reshape(50, 1, -1)).all(dim=2).any(dim=1).all())   # every image is one of the client's
    assert not torch.equal(a, deploy.calibration_images(small_train, client, 50, seed=4))
    for bad in (0, 301, 2.5):
        with pytest.raises(ValueError):
            deploy.calibration_images(small_train, client, bad, seed=0)
    with pytest.raises(ValueError):
        deploy.calibration_images(small_train, torch.tensor([], dtype=torch.long), 1, seed=0)


def test_calibration_reader_yields_every_image_once():
    images = torch.randn(10, 1, 28, 28)
    reader = deploy.ArrayCalibrationReader(images, batch_size=4)
    batches = []
    while (item := reader.get_next()) is not None:
        batches.append(item[deploy.INPUT_NAME])
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images.numpy())
    reader.rewind()
    assert reader.get_next() is not None
    with pytest.raises(ValueError):
        deploy.ArrayCalibrationReader(torch.empty(0, 1, 28, 28))


def test_measure_speed_reports_interleaved_medians(trained, small_test, tmp_path):
    path = tmp_path / "m.onnx"
    deploy.export_onnx(trained["mlp"], path)
    predictors = {"eager": deploy.torch_predictor(trained["mlp"]), "ort": deploy.ort_predictor(path)}
    threads = torch.get_num_threads()
    for clock in ("cpu", "wall"):
        speed = deploy.measure_speed(predictors, small_test.x[:16], batch=16, repeats=3, target_s=0.001, clock=clock)
        assert set(speed) == set(predictors)
        for s in speed.values():
            assert s.batch == 16 and s.latency_s > 0 and s.throughput > 0
            assert s.latency_ms == pytest.approx(1e3 * s.latency_s) and s.latency_us == pytest.approx(1e6 * s.latency_s)
            assert s.latency_q1_s <= s.latency_s <= s.latency_q3_s
    assert torch.get_num_threads() == threads                                 # restored
    with pytest.raises(ValueError):
        deploy.measure_speed({}, small_test.x[:16])
    with pytest.raises(ValueError):
        deploy.measure_speed(predictors, small_test.x[:8], batch=16)
    with pytest.raises(ValueError):
        deploy.measure_speed(predictors, small_test.x[:16], batch=16, clock="sundial")


def test_identity_graph_returns_its_input_and_is_the_latency_floor(trained, small_test, tmp_path):
    path = tmp_path / "identity.onnx"
    assert deploy.export_identity_onnx(path) == os.path.getsize(path) > 0
    x = small_test.x[:4].numpy()
    assert np.array_equal(deploy.ort_predictor(path)(x), x)            # a graph that does nothing
    model = tmp_path / "m.onnx"
    deploy.export_onnx(trained["mlp"], model)
    speed = deploy.measure_speed({"empty": deploy.ort_predictor(path), "mlp": deploy.ort_predictor(model)},
                                 small_test.x[:8], batch=8, repeats=5, target_s=0.002)
    assert speed["empty"].latency_s < speed["mlp"].latency_s             # the floor is below a real model


def test_op_profile_names_the_operators_that_ran(trained, small_test, calib, tmp_path):
    fp32 = tmp_path / "fp32.onnx"
    deploy.export_onnx(trained["cnn"], fp32)
    deploy.quantize_static_int8(fp32, tmp_path / "int8.onnx", calib)
    profile = deploy.op_profile(tmp_path / "int8.onnx", small_test.x[:8], runs=3)
    assert profile and all(v >= 0 for v in profile.values())
    assert any(k.startswith("QLinearConv") for k in profile)          # the runtime fused QDQ + Conv into int8 kernels
    assert list(profile.values()) == sorted(profile.values(), reverse=True)


def test_session_checks_threads(tmp_path, trained):
    path = tmp_path / "m.onnx"
    deploy.export_onnx(trained["mlp"], path)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError):
            deploy.session(path, threads=bad)


# ---- structured pruning for the deployment pipeline (helpers.pruning, appended for Chapter 5) --------------

def test_channel_masks_cut_whole_units_and_shrinking_keeps_the_function(trained, small_test):
    model = trained["cnn"]
    masks = pruning.channel_masks_small_cnn(model, 0.5)
    assert set(masks) == {"features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias",
                          "classifier.0.weight", "classifier.0.bias"}                  # the output layer is kept
    for name in ("features.0", "features.3", "classifier.0"):
        w, b = masks[f"{name}.weight"], masks[f"{name}.bias"]
        rows = w.reshape(w.shape[0], -1)
        assert bool((rows.all(dim=1) | ~rows.any(dim=1)).all())                         # whole rows, kept or not
        assert torch.equal(rows.all(dim=1), b) and int(b.sum()) == round(0.5 * len(b))
        norms = dict(model.named_parameters())[f"{name}.weight"].detach().abs().reshape(len(b), -1).sum(1)
        assert norms[b].min() >= norms[~b].max()                                          # the largest L1 norms
    masked = pruning.apply_masks(copy.deepcopy(model), masks)
    small = pruning.shrink_small_cnn(masked, 0.5)
    assert count_parameters(small) < count_parameters(model) / 2
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(small_test.x[:500]), masked.eval()(small_test.x[:500]),
                                   rtol=1e-5, atol=1e-5)
    assert all(bool(m.all()) for m in pruning.channel_masks_small_cnn(model, 1.0).values())


def test_channel_masks_check_arguments(trained):
    for bad in (0, 1.5, True, "half"):
        with pytest.raises(ValueError):
            pruning.channel_masks_small_cnn(trained["cnn"], bad)
    with pytest.raises(ValueError, match="SmallCNN"):
        pruning.channel_masks_small_cnn(trained["mlp"], 0.5)
    with pytest.raises(ValueError):
        pruning.FederatedChannelPruner(final_keep=0, begin=0, end=2)
    with pytest.raises(ValueError):
        pruning.FederatedChannelPruner(final_keep=0.5, begin=3, end=2)


def test_federated_channel_pruner_masks_the_global_model(small_train, small_test):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        parts = [torch.arange(k, 3000, 3) for k in range(3)]
        pruner = pruning.FederatedChannelPruner(final_keep=0.5, begin=0, end=2)
        assert [pruner.target_keep(t) for t in (0, 1, 2, 3)] == [1.0, 0.5625, 0.5, 0.5]
        run = run_federated(SmallCNN(), small_train, parts, small_test, book_config(rounds=2, local_steps=5),
                            strategy=pruner)
    finally:
        torch.set_num_threads(threads)
    assert [row["keep"] for row in pruner.log] == [0.5625, 0.5]
    params = dict(run.model.named_parameters())
    for name, mask in pruner.masks.items():                      # the mask survived local steps and FedAvg
        assert bool((params[name].detach()[~mask] == 0).all())
    small = pruning.shrink_small_cnn(run.model, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(small_test.x[:200]), run.model.eval()(small_test.x[:200]),
                                   rtol=1e-5, atol=1e-5)


def test_farthest_client_by_hand():
    from helpers.chapters.ch5 import farthest_client
    labels = torch.tensor([0, 0, 1, 1, 0, 1, 2, 2, 2, 0])
    parts = [torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([6, 7, 8]), torch.tensor([4, 9])]
    # client 0: {0: 1/2, 1: 1/2}; client 2 holds only label 2 (TV distance 1), the others at most 1/2
    assert farthest_client(labels, parts, 3) == 2
    assert farthest_client(labels, parts, 3, to=2) in (0, 1, 3)


def test_int8_variants_task_on_real_data(small_train, small_test):
    """One seed of the section's grid on a real slice: the float32 ONNX file scores what PyTorch scores, every
    int8 file is smaller than it and within 2 points of its accuracy, and the farthest client is not client 0."""
    from helpers.chapters import ch5
    from helpers.data import partition_dirichlet
    from helpers.federated import FedConfig
    parts = partition_dirichlet(small_train.y, 10, 0.5, seed=0)
    cfg = FedConfig(rounds=3, fraction=1.0, local_steps=40, batch_size=32, lr=0.04, momentum=0.9, seed=0)
    r = ch5.int8_variants_task(seed=0, train=small_train, test=small_test, partition=parts, config=cfg, calib_size=64)
    assert set(r["acc"]) == {"float32", *ch5.INT8_VARIANTS}
    assert abs(r["acc"]["float32"] - r["torch_acc"]) <= 0.001
    assert r["acc"]["float32"] > 0.5, r["acc"]
    for name in ch5.INT8_VARIANTS:
        assert r["bytes"][name] < r["bytes"]["float32"], name
        assert abs(r["acc"][name] - r["acc"]["float32"]) < 0.02, (name, r["acc"])
    assert r["far_client"] != 0
