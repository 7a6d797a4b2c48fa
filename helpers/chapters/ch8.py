"""Chapter 8's experiments (one run = one seed): gradient inversion of one client's decoded uploads, and
client-level DP-FedAvg with float32 or quantized uploads."""

from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import numpy as np
import torch
from IPython.display import Markdown

from ..codecs import Codec, Float32Codec, QuantizedCodec, TopKCodec
from ..data import _DATASETS, TensorDataset
from ..error_feedback import ErrorFeedback
from ..experiment import MLP_LR
from ..federated import FedConfig, run_federated
from ..glue import glue
from ..models import MLP
from ..privacy import DPFedAvg, invert_gradients, match_reconstructions, psnr, ssim
from ..reproducibility import seed_everything
from ..stats import Paired, paired
from ..training import client_generator, evaluate, float_state, local_train

__all__ = ["CODECS", "PSNR_MARGIN_DB", "make_codec", "inversion_task", "dp_task", "compare_db", "glue_db_comparison"]

CODECS = ("float32", "q8", "q4", "q2", "top10", "top1")
"""The uplinks the attack is run against: the book's float32, 8/4/2-bit and top-10%/top-1% codecs."""

PSNR_MARGIN_DB = 1.0
"""The equivalence margin of a PSNR comparison (dB), stated before any run: a 1 dB difference is hard to see."""


def make_codec(name: str) -> Codec:
    """The uplink codec called ``name`` (one of :data:`CODECS`)."""
    if name == "float32":
        return Float32Codec()
    if name in ("q8", "q4", "q2"):
        return QuantizedCodec(int(name[1:]))
    if name in ("top10", "top1"):
        return TopKCodec(int(name[3:]) / 100)
    raise ValueError(f"unknown codec {name!r}; choose one of {CODECS}")


MEAN, STD = _DATASETS["fashion_mnist"][2:4]   # Fashion-MNIST's normalization (helpers.data)


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalized Fashion-MNIST images back to [0, 1] pixels."""
    return (x * STD + MEAN).clamp(0, 1)


def inversion_task(*, seed: int, train: TensorDataset, pool: torch.Tensor, codec: str = "float32",
                   error_feedback: bool = False, uploads: int = 1, batch: int = 1, local_steps: int = 1,
                   attack_steps: int = 300) -> dict:
    """One gradient-inversion attack. The seed draws the book's MLP at initialisation and ``batch`` images of
    the client pool. A curious server sends the client the same global model ``uploads`` times; each time the
    client runs ``local_steps`` SGD steps (lr ``MLP_LR``, momentum 0.9) on its ``batch`` images (one batch) and
    uploads through ``codec`` (with ``error_feedback``: the residual is carried to the next upload). The
    attacker inverts the sum of the decoded uploads (labels inferred for one image, known for more).
    Returns the original and reconstructed pixels, the per-image PSNR (dB) and SSIM, and the upload bytes."""
    seed_everything(seed)
    net = MLP()
    gen = torch.Generator().manual_seed(seed)
    idx = pool[torch.randperm(len(pool), generator=gen)[:batch]]
    start = float_state(net)
    worker = copy.deepcopy(net)
    uplink = make_codec(codec)
    ef = ErrorFeedback() if error_feedback else None
    seen = {k: torch.zeros_like(v) for k, v in start.items()}
    sizes = []
    for _ in range(uploads):
        worker.load_state_dict(start)
        local_train(worker, train, idx, batch_size=batch, lr=MLP_LR, momentum=0.9,
                    generator=client_generator(seed, 1, 0), steps=local_steps)
        update = {k: worker.state_dict()[k] - v for k, v in start.items()}
        if ef is not None:
            update = ef.compensate(0, update)
        payload = uplink.encode(update)
        sent = uplink.decode(payload, reference=start)
        if ef is not None:
            ef.remember(0, update, sent)
        sizes.append(len(payload))
        seen = {k: seen[k] + sent[k] for k in seen}
    mean, std = MEAN, STD
    x, labels = invert_gradients(net, seen, num_images=batch, labels=None if batch == 1 else train.y[idx],
                                 steps=attack_steps, bounds=((0 - mean) / std, (1 - mean) / std),
                                 support_only=codec.startswith("top"), seed=seed)
    original = _pixels(train.x[idx])
    recon = match_reconstructions(_pixels(x), original)
    return {"original": original, "recon": recon, "psnr": psnr(recon, original).tolist(),
            "ssim": ssim(recon, original).tolist(), "label_ok": bool((labels == train.y[idx]).all()),
            "bytes": sizes[0]}


def dp_task(*, seed: int, train: TensorDataset, test: TensorDataset, partition: Sequence[torch.Tensor],
            config: FedConfig, clip: float, noise_multiplier: float | None, codec: str = "float32",
            val: TensorDataset | None = None) -> dict:
    """One seed of FedAvg (``noise_multiplier=None``: plain FedAvg with Poisson sampling, clipping off) or of
    client-level DP-FedAvg (:class:`helpers.privacy.DPFedAvg`) with uplink ``codec``. Returns the final test
    accuracy (and validation accuracy when ``val`` is given) and the upload bytes per client."""
    seed_everything(seed)
    strategy = DPFedAvg(clip=clip if noise_multiplier is not None else 1e12,
                        noise_multiplier=noise_multiplier or 0.0, seed=seed)
    run = run_federated(MLP(), train, partition, test, dataclasses.replace(config, seed=seed),
                        uplink=make_codec(codec), strategy=strategy)
    out = {"acc": run.history.final_accuracy, "bounded": sum(r.bounded for r in run.history.rows),
           "bytes_per_upload": run.history.rows[0].bytes_up / max(run.history.rows[0].clients, 1)}
    if val is not None:
        out["val_acc"] = evaluate(run.model, val)[1]
    return out


def compare_db(a: Sequence[float], b: Sequence[float], *, margin_db: float = PSNR_MARGIN_DB) -> Paired:
    """PSNR of attack A against attack B on the same seeds/images (dB): :func:`helpers.stats.paired` on dB/100,
    so that its "pp" fields read in dB, with the margin :data:`PSNR_MARGIN_DB`."""
    return paired(np.asarray(a, dtype=float) / 100, np.asarray(b, dtype=float) / 100, margin_pp=margin_db)


def glue_db_comparison(name: str, c: Paired, a: str, b: str) -> None:
    """:func:`helpers.experiment.glue_comparison` for a PSNR comparison: the same glue names, worded in dB."""
    for key, value in c.glue_values(name).items():
        glue(key, value, display=False)
    glue(f"{name}_p", round(c.p_sign_flip, 3), display=False)
    glue(f"{name}_explain", Markdown(c.explain(a, b).replace(" pp", " dB")),
         display=False)
