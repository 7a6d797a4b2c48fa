"""The chapters' stored outputs keep the book's comparison convention (CONTRIBUTING, "One rule for comparisons").

Every comparison ``X`` a chapter glues has ``X_diff_pp``, ``X_ci_low_pp``, ``X_ci_high_pp``, ``X_n``,
``X_margin_pp`` and ``X_verdict``, and the verdict is the one its interval and margin give. No chapter's prose
calls an undecided comparison "indistinguishable" or "no difference". nbval re-executes the chapters; this
test reads what they glued when their outputs were last stored, so it costs no training.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
FIELDS = ("diff_pp", "ci_low_pp", "ci_high_pp", "n", "margin_pp", "verdict")
REQUIRED = ["ch1_central_vs_iid", "ch1_iid_vs_dirichlet", "ch2_sr_vs_det_2bit", "ch2_learned_vs_frozen_2bit",
            "ch2_qat_vs_ptq_2bit", "ch3_dense_vs_gradual", "ch3_top1ef_vs_top1", "ch3_dense_vs_top10ef",
            "ch4_kd_vs_scratch", "ch6_seen_vs_unseen", "ch6_trimmed_vs_fedavg_signflip",
            # issue 21: the seed's lessons in the regimes where they should hold
            "ch1_central_same_schedule_vs_iid", "ch1_central_halving_vs_constant", "ch2_learned_vs_frozen_maxabs_2bit", "ch3_gradual_vs_oneshot_090", "ch3_gradual_vs_oneshot_095",
            "ch3_q4_vs_top10", "ch4_kd_vs_label_smoothing", "ch4_logits_vs_mlp16_q8",
            "ch4_feddf_vs_fedavg_shards",
            # issue 23: Chapter 6's methods, skew, stragglers and attacks sections
            "ch6_scaffold_vs_fedavg_alpha005", "ch6_scaffold_vs_fedavg_time", "ch6_scaffold_q4var_vs_f32var",
            "ch6_q4_vs_f32_alpha005", "ch6_local_only_vs_global", "ch6_auc_wait_q4_vs_wait",
            "ch6_auc_deadline_q4_vs_wait_q4", "ch6_alie_median_vs_clean", "ch6_alie_trimmed_vs_clean",
            "ch6_alie_normbound_vs_clean",
            "ch6_q4_vs_f32_signflip20_trimmed", "ch6_noise_vs_clean_fedavg",
            # issue 23: Chapter 5's int8 variants over six seeds
            "ch5_static_vs_fp32", "ch5_per_tensor_vs_per_channel", "ch5_calib_test_vs_client0",
            # issue 25: Chapter 8 (PSNR comparisons in dB with a 1 dB margin; accuracy in pp)
            "ch8_psnr_f32_vs_q2", "ch8_psnr_f32_vs_top1", "ch8_psnr_q2ef_vs_q2", "ch8_psnr_b1_vs_b32", "ch8_dp_q8_vs_dp",
            "ch8_nodp_vs_dp"]


def glued(path: Path) -> dict[str, str]:
    """name -> the stored text of every value the notebook glued."""
    out = {}
    for cell in json.loads(path.read_text())["cells"]:
        for o in cell.get("outputs", []):
            name = o.get("metadata", {}).get("scrapbook", {}).get("name")
            if name:
                data = o["data"]
                v = data.get("application/papermill.record/text/markdown") or data.get(
                    "application/papermill.record/text/plain")
                out[name] = "".join(v) if isinstance(v, list) else v
    return out


ALL = {p.name: glued(p) for p in CHAPTERS}


def comparisons() -> list[tuple[str, str]]:
    return [(chapter, name[: -len("_verdict")]) for chapter, g in ALL.items() for name in g
            if name.endswith("_verdict") and f"{name[: -len('_verdict')]}_ci_low_pp" in g]


def test_the_required_comparisons_are_glued():
    names = {name for _, name in comparisons()}
    assert not [r for r in REQUIRED if r not in names]


@pytest.mark.parametrize("chapter,name", comparisons())
def test_each_glued_verdict_follows_from_its_interval_and_margin(chapter, name):
    g = ALL[chapter]
    missing = [f for f in FIELDS if f"{name}_{f}" not in g]
    assert not missing, (chapter, name, missing)
    low, high = float(g[f"{name}_ci_low_pp"]), float(g[f"{name}_ci_high_pp"])
    margin, mean = float(g[f"{name}_margin_pp"]), float(g[f"{name}_diff_pp"])
    verdict = g[f"{name}_verdict"].strip("'\"")
    assert low <= mean <= high and margin > 0 and int(g[f"{name}_n"]) >= 3, (chapter, name)
    # the glued bounds are rounded to 2 decimals: a bound within 0.005 of a boundary cannot be checked here
    near = [abs(x) for x in (low, high, low + margin, high - margin)]
    if min(near) < 0.006:
        return
    expected = ("equivalent" if -margin < low and high < margin else "better" if low > 0 else
                "worse" if high < 0 else "undecided")
    assert verdict == expected, (chapter, name, low, high, margin, verdict)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_no_chapter_calls_an_undecided_comparison_equal(path):
    text = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"])
    text += "\n".join(ALL[path.name].values())
    # the words in quotes are allowed: that is the book saying what "undecided" does not mean
    bad = re.findall(r"[^.\n]*(?<![\"“])\b(?:indistinguishable|no difference)\b[^.\n]*", text, flags=re.IGNORECASE)
    assert not bad, bad
