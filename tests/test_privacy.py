"""helpers.privacy on real Fashion-MNIST: gradient inversion recovers an image from a float32 update, the DP
pieces clip, add noise of the stated size, and the accountant's epsilon matches a hand derivation."""

import copy
import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from helpers import codecs
from helpers.aggregation import FedAvg
from helpers.models import MLP
from helpers.privacy import (DPFedAvg, clip_update, dp_epsilon, gaussian_noise_like, infer_label, invert_gradients,
                             match_reconstructions, psnr, ssim, update_norm)
from helpers.reproducibility import seed_everything
from helpers.training import client_generator, float_state, local_train

MEAN, STD = 0.2860, 0.3530


def one_image_update(train, i: int, seed: int = 0):
    seed_everything(seed)
    net = MLP()
    start = float_state(net)
    worker = copy.deepcopy(net)
    local_train(worker, train, torch.tensor([i]), batch_size=1, lr=0.02, momentum=0.9,
                generator=client_generator(seed, 1, 0), steps=1)
    return net, {k: worker.state_dict()[k] - v for k, v in start.items()}


def pixels(x):
    return (x * STD + MEAN).clamp(0, 1)


def test_inversion_of_a_float32_one_image_update_recovers_the_image(small_train):
    net, update = one_image_update(small_train, 7)
    assert infer_label(net, update) == int(small_train.y[7])
    x, labels = invert_gradients(net, update, steps=200, bounds=(-MEAN / STD, (1 - MEAN) / STD), seed=0)
    assert int(labels[0]) == int(small_train.y[7])
    original = pixels(small_train.x[7:8])
    score = float(psnr(pixels(x), original)[0])
    noise = float(psnr(pixels(torch.randn_like(x)), original)[0])
    assert score > 22 and score > noise + 12, (score, noise)
    assert float(ssim(pixels(x), original)[0]) > 0.5


def test_inversion_through_the_top1_codec_still_matches_and_validates_arguments(small_train):
    net, update = one_image_update(small_train, 3)
    codec = codecs.TopKCodec(0.01)
    decoded = codec.decode(codec.encode(update), reference=float_state(net))
    x, _ = invert_gradients(net, decoded, steps=50, support_only=True, seed=1)
    assert x.shape == (1, 1, 28, 28) and torch.isfinite(x).all()
    with pytest.raises(ValueError, match="labels"):
        invert_gradients(net, update, num_images=2)
    with pytest.raises(ValueError, match="steps"):
        invert_gradients(net, update, steps=0)
    with pytest.raises(ValueError, match="all zeros"):
        invert_gradients(net, {k: torch.zeros_like(v) for k, v in update.items()}, labels=torch.tensor([0]))


def test_psnr_ssim_values_and_matching(small_train):
    a = pixels(small_train.x[:3])
    b = (a + 0.1).clamp(0, 1)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    assert torch.allclose(psnr(b, a), 10 * torch.log10(1 / mse), atol=1e-4)
    assert torch.allclose(ssim(a, a), torch.ones(3), atol=1e-5)
    assert torch.equal(match_reconstructions(a[[2, 0, 1]], a), a)
    with pytest.raises(ValueError):
        psnr(a, a[:2])


def test_clip_update_bounds_the_norm_and_keeps_small_updates(small_train):
    _, update = one_image_update(small_train, 0)
    n = update_norm(update)
    clipped = clip_update(update, n / 4)
    assert update_norm(clipped) == pytest.approx(n / 4, rel=1e-5)
    ratio = clipped["net.1.weight"] / update["net.1.weight"]
    assert torch.allclose(ratio[torch.isfinite(ratio)], torch.tensor(0.25), atol=1e-5)
    same = clip_update(update, 2 * n)
    assert all(torch.equal(same[k], update[k]) for k in update)
    with pytest.raises(ValueError, match="clip"):
        clip_update(update, 0)


def test_gaussian_noise_has_the_stated_std():
    noise = gaussian_noise_like({"w": torch.zeros(200_000)}, 0.3, torch.Generator().manual_seed(0))["w"]
    assert float(noise.std()) == pytest.approx(0.3, rel=0.01)
    assert abs(float(noise.mean())) < 0.003


def test_epsilon_matches_the_rdp_of_one_gaussian_step_and_grows_with_rounds():
    sigma, delta = 1.5, 1e-5
    # one unsampled Gaussian step: RDP(a) = a / (2 sigma^2); Opacus converts with Balle et al.'s bound
    best = min(a / (2 * sigma ** 2) - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
               for a in RDPAccountant.DEFAULT_ALPHAS)
    assert dp_epsilon(sigma, 1.0, 1, delta) == pytest.approx(best, rel=1e-6)
    eps = [dp_epsilon(1.0, 0.2, r, delta) for r in (1, 5, 15, 50)]
    assert eps == sorted(eps) and len(set(eps)) == 4
    assert dp_epsilon(1.0, 0.02, 15, delta) < dp_epsilon(1.0, 0.2, 15, delta)
    with pytest.raises(ValueError, match="sample_rate"):
        dp_epsilon(1.0, 1.5, 3)


def test_dpfedavg_clips_adds_noise_and_divides_by_the_expected_count(small_train):
    ups = [one_image_update(small_train, i)[1] for i in range(4)]
    s = DPFedAvg(clip=1e-3, noise_multiplier=0.0)
    chosen = s.sample_clients(10, 0.4, np.random.default_rng(0))
    assert all(0 <= c < 10 for c in chosen)
    agg = s.aggregate(ups, [1, 1, 1, 1])
    expected = {k: sum(clip_update(u, 1e-3)[k] for u in ups) / 4.0 for k in ups[0]}
    assert all(torch.allclose(agg[k], expected[k], atol=1e-9) for k in agg)
    assert s.last_bounded == 4
    noisy = DPFedAvg(clip=1e-3, noise_multiplier=2.0, seed=1)
    noisy.sample_clients(10, 0.4, np.random.default_rng(0))
    diff = torch.cat([(noisy.aggregate(ups, [1] * 4)[k] - expected[k]).flatten() for k in agg])
    assert float(diff.std()) == pytest.approx(2.0 * 1e-3 / 4.0, rel=0.02)
    assert isinstance(s, FedAvg)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPFedAvg(clip=1.0, noise_multiplier=-1)
