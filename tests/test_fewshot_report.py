"""benchmarks/fewshot.py: the statistics and report plumbing, on hand-made records (no model).

The few-shot run itself is exercised by `python benchmarks/fewshot.py --quick` in CI.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("scipy")

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "fewshot.py"
_spec = importlib.util.spec_from_file_location("fewshot_bench", _PATH)
fs = importlib.util.module_from_spec(_spec)
sys.modules["fewshot_bench"] = fs  # dataclasses look their module up there
_spec.loader.exec_module(fs)


def test_paired_tests_by_hand():
    a = [0.80, 0.90, 0.85, 0.70, 0.95]
    b = [0.75, 0.84, 0.88, 0.62, 0.91]
    r = fs.paired_tests(a, b)
    d = [x - y for x, y in zip(a, b)]  # 0.05, 0.06, -0.03, 0.08, 0.04
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    t = mean / (sd / math.sqrt(5))
    from scipy.stats import t as tdist

    assert r["mean_diff"] == pytest.approx(mean)
    assert r["t_p"] == pytest.approx(2 * tdist.sf(abs(t), 4), rel=1e-9)
    assert (r["wins"], r["losses"], r["n"]) == (4, 1, 5)
    # Wilcoxon, exact: |d| ranks 0.03→1 (the negative one), so W- = 1; P(W <= 1) = 2/32, two-sided 0.125
    assert r["wilcoxon_p"] == pytest.approx(0.125)
    # all five positive: the smallest possible two-sided p, 2/32
    assert fs.paired_tests([1, 2, 3, 4, 5], [0.9, 1.8, 2.7, 3.6, 4.5])["wilcoxon_p"] == pytest.approx(0.0625)
    # undefined cases give NaN, not an exception
    one = fs.paired_tests([0.5], [0.4])
    assert math.isnan(one["t_p"]) and one["mean_diff"] == pytest.approx(0.1)
    same = fs.paired_tests([0.5, 0.6], [0.5, 0.6])
    assert math.isnan(same["t_p"]) and math.isnan(same["wilcoxon_p"])


def _rec(method, K, seed, acc, **kw):
    base = dict(phase="test", method=method, K=K, seed=seed, lr=1e-4, acc=acc, stability=0.9, raw_stability=0.8,
                alignment=0.1, clip_rate=0.0, conflict_rate=0.4, step_s_median=0.5, final_train_loss=0.3)
    return {**base, **kw}


def test_summarize_picks_best_baseline_and_pairs_by_seed():
    methods = ("adamw", "adamw+clip", "sgg-all")
    recs = []
    for s in range(3):
        recs += [_rec("adamw", 4, s, 0.60 + 0.01 * s), _rec("adamw+clip", 4, s, 0.70 + 0.01 * s),
                 _rec("sgg-all", 4, s, 0.72 + 0.02 * s)]
        recs += [_rec("adamw", 8, s, 0.90), _rec("adamw+clip", 8, s, 0.80), _rec("sgg-all", 8, s, 0.85 + 0.01 * s)]
    recs.append(_rec("adamw", 4, 9, 0.99))  # an incomplete (K, seed) block: must be ignored
    out = fs.summarize(recs, methods, (4, 8))
    cell, comps = out["cell"], out["comps"]
    assert cell[("adamw", 4)]["n"] == 3 and cell[("adamw", 4)]["acc_mean"] == pytest.approx(0.61)
    assert cell[("adamw", 4)]["acc_std"] == pytest.approx(0.01)
    assert comps[("sgg-all", 4)]["baseline"] == "adamw+clip"
    assert comps[("sgg-all", 4)]["mean_diff"] == pytest.approx(0.03)  # (0.02 + 0.03 + 0.04) / 3
    assert comps[("sgg-all", 8)]["baseline"] == "adamw"
    assert comps[("sgg-all", 8)]["mean_diff"] == pytest.approx(-0.04)
    # pooled over (K, seed), against the best baseline of each K
    assert comps[("sgg-all", "all")]["n"] == 6
    assert comps[("sgg-all", "all")]["mean_diff"] == pytest.approx((0.03 - 0.04) / 2)
    text = fs.render(out, {"lrs": {K: {m: 1e-4 for m in methods} for K in (4, 8)}},
                     fs.Config(ks=(4, 8), methods=methods), True, None)
    assert "| `sgg-all` | 74.0 ± 2.0 | 86.0 ± 1.0 |" in text
    assert "**does not hold here** (no significant difference)" in text


def test_results_section_is_appended_then_replaced(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmarks\n\nthe microbenchmark table\n")
    fs.write_results_section(path, "first body")
    fs.write_results_section(path, "second body")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nthe microbenchmark table\n")
    assert "second body" in text and "first body" not in text
    assert text.count(fs.BEGIN) == 1 and text.rstrip().endswith(fs.END)
    new = tmp_path / "NEW.md"
    fs.write_results_section(new, "body")
    assert new.read_text().startswith(fs.BEGIN)


def test_batch_schedule_is_epochs_of_the_training_set():
    idx = list(range(100, 120))
    sched = fs.batch_schedule(idx, 8, 10, seed=3, K=4)
    assert len(sched) == 10 and all(len(b) == 8 for b in sched)
    flat = [i for b in sched for i in b]
    assert sorted(flat[:20]) == idx and sorted(flat[20:40]) == idx  # whole epochs, each example once
    assert sched == fs.batch_schedule(idx, 8, 10, seed=3, K=4)
    assert sched != fs.batch_schedule(idx, 8, 10, seed=4, K=4)


def test_sign_flip_permutation_is_exact_for_small_n():
    # all 5 differences positive: only the all-plus and all-minus patterns reach |mean|: p = 2/32
    assert fs.sign_flip_p([0.1, 0.2, 0.05, 0.3, 0.1]) == pytest.approx(2 / 32)
    # d = (1, -1): every pattern has |mean| 0 or 1 >= 0: p = 1
    assert fs.sign_flip_p([1.0, -1.0]) == pytest.approx(1.0)
    # by hand for (3, 1): patterns ++ (2), +- (1), -+ (1), -- (2): |mean| >= 2 in 2 of 4
    assert fs.sign_flip_p([3.0, 1.0]) == pytest.approx(0.5)
    assert math.isnan(fs.sign_flip_p([]))
    # the random branch (n > 16) agrees with the exact value of a symmetric null roughly
    d = [0.01 * (i % 3 - 1) for i in range(20)]
    assert fs.sign_flip_p(d) > 0.5


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
    import numpy as np

    rng = np.random.default_rng(1)
    small, large = rng.normal(0.05, 0.1, 8), rng.normal(0.05, 0.1, 200)
    lo, hi = fs.bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = fs.bootstrap_ci(large)
    assert (hi2 - lo2) < (hi - lo)
    assert all(math.isnan(x) for x in fs.bootstrap_ci([0.1]))


def test_holm_by_hand():
    adj = fs.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")})
    # sorted 0.01, 0.03, 0.04 with multipliers 3, 2, 1 and a running maximum
    assert adj["a"] == pytest.approx(0.03) and adj["c"] == pytest.approx(0.06) and adj["b"] == pytest.approx(0.06)
    assert math.isnan(adj["d"])


def test_method_overrides_and_plan_order():
    assert fs.method_spec("sgg-all@lambda_dir=0.5")["sgg"] == dict(lambda_dir=0.5, lambda_mag=1.0, lambda_align=1.0)
    assert fs.method_spec("sgg-all@reference=ema")["sgg"]["reference"] == "ema"
    assert fs.spec_key("sgg-all") != fs.spec_key("sgg-all@lambda_dir=0.5")
    with pytest.raises(ValueError):
        fs.method_spec("adamw@lambda_dir=0.5")
    sens = fs.sens_variants()
    assert len(sens) == 12 and "sgg-all@lambda_dir=0.2" not in sens  # sgg-all's own values are sgg-all
    parts = [(p, K) for p, K, _ in fs.plan_blocks(fs.FULL)]
    assert parts[:3] == [("main", 1), ("main", 2), ("main", 4)]  # the main table first, K-major
    assert ("sens", 1) in parts and ("ref", 1) in parts


def test_variants_pair_with_sgg_all_on_the_same_seeds():
    recs = [_rec("sgg-all", 1, s, 0.6 + 0.01 * s) for s in range(4)]
    recs += [_rec("sgg-all@lambda_dir=0", 1, s, 0.55 + 0.01 * s) for s in range(3)]
    var = fs.summarize_variants(recs, fs.Config(sens_ks=(1,), ref_ks=()))
    v = var[("sgg-all@lambda_dir=0", 1)]
    assert v["n"] == 3 and v["vs_sgg_all"]["mean_diff"] == pytest.approx(-0.05)
    assert "| `lambda_dir=0` | 1 | 3 |" in "\n".join(fs.render_variants(var))
