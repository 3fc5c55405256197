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
    # every difference zero: p = 1
    assert fs.sign_flip_p([0.0] * 20) == 1.0


def _brute_sign_flip(d):
    import itertools

    obs = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= obs - 1e-12
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


def test_sign_flip_p_is_exact_at_20_pairs():
    import numpy as np

    # all 20 differences positive: only the all-plus and all-minus patterns reach it: p = 2/2^20 ≈ 1.9e-6
    assert fs.sign_flip_p([0.01 * (1 + i % 4) for i in range(20)]) == pytest.approx(2 / 2 ** 20, rel=0, abs=1e-15)
    # one negative difference, smaller than every positive one: the patterns reaching |sum| are all-plus,
    # all-minus and the two that flip only that one (its flip raises the sum): 4/2^20
    d = [0.05] * 19 + [-0.01]
    assert fs.sign_flip_p(d) == pytest.approx(4 / 2 ** 20, rel=0, abs=1e-15)
    # against brute-force enumeration, with ties (accuracies on a 300-document test set are multiples of 1/300)
    rng = np.random.default_rng(3)
    for n in (7, 12, 15):
        d = (rng.integers(-6, 10, size=n) / 300).tolist()
        assert fs.sign_flip_p(d) == pytest.approx(_brute_sign_flip(d), rel=0, abs=1e-12)
    # the exact count does not depend on the order of the pairs (the halves are split by position)
    d = (rng.integers(-6, 10, size=20) / 300).tolist()
    assert fs.sign_flip_p(d) == pytest.approx(fs.sign_flip_p(d[::-1]), rel=0, abs=1e-12)
    # above exact_max, the seeded random branch estimates the exact value
    assert fs.sign_flip_p(d, exact_max=10) == pytest.approx(fs.sign_flip_p(d), abs=0.01)


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


def test_method_overrides_of_the_transfer_arms():
    assert fs.method_spec("multitask@mu=0.3")["mu"] == 0.3
    assert fs.method_spec("sequential@lr1=0.0004")["lr1"] == 4e-4
    assert fs.method_spec("sgg-dir@pool=mean")["pool"] == "mean"
    assert fs.method_spec("multitask@mu=0.3,pool=mean") == {**fs.method_spec("multitask@mu=0.3"), "pool": "mean"}
    rand = fs.method_spec("sgg-rand")
    assert rand["shuffle"] and rand["sgg"] == fs.method_spec("sgg-dir")["sgg"]
    # the main table's arms keep their spec hash (the main run's records are reused by the transfer experiment)
    assert "pool" not in fs.method_spec("sgg-dir") and fs.spec_key("sgg-dir") != fs.spec_key("sgg-dir@pool=mean")
    assert fs.FULL.methods == fs.MAIN_METHODS and "multitask" not in fs.FULL.methods
    with pytest.raises(ValueError):
        fs.method_spec("adamw+clip@lambda_dir=0.5")
    cands, grid = fs.arm_candidates("multitask", fs.FULL)
    assert cands == ["multitask@mu=0.3", "multitask@mu=1"] and grid == fs.FULL.transfer_lr_grid
    assert fs.arm_candidates("sequential", fs.QUICK)[0][0] == "sequential@lr1=0.0001,source_steps=4"


def _transfer_records(effects: dict, n: int = 20, K: int = 1, noise: float = 0.02, seed: int = 0):
    """Test records of every transfer arm at K: acc = 0.6 + effect + per-seed noise shared by all arms
    + arm-specific noise (seeded)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    recs = []
    for s in range(n):
        shared = rng.normal(0, 0.05)
        for a in fs.TRANSFER_ARMS:
            acc = 0.6 + effects.get(a, 0.0) + shared + rng.normal(0, noise)
            recs.append(_rec(a, K, s, acc, spec=fs.spec_key(a), align_src=0.02))
    return recs


def _chosen(ks=(1,)):
    return {(K, a, "cls"): (a, 1e-4) for K in ks for a in fs.TRANSFER_ARMS}


@pytest.mark.parametrize("effects, case", [
    ({}, 0),                                                                      # no gain to attribute
    ({"sgg-dir": 0.10, "sgg-all": 0.10, "sgg-rand": 0.10}, 1),                    # the control gains: regularisation
    ({"sgg-dir": 0.10, "sgg-all": 0.10, "multitask": 0.02, "sequential": 0.03}, 2),   # SGG's own
    ({"sgg-dir": 0.10, "sgg-all": 0.10, "multitask": 0.10, "sequential": 0.06}, 3),   # the extra labels
    ({"sgg-dir": 0.10, "sgg-all": 0.10, "multitask": 0.15, "sequential": 0.06}, 3),   # ... used better elsewhere
])
def test_decision_rule_cases(effects, case):
    summ = fs.summarize_transfer(_transfer_records(effects), _chosen(), fs.Config(transfer_ks=(1,)))
    assert summ["decision"][1]["case"] == case
    assert summ["cells"][1]["adamw+clip"]["n"] == 20
    if case == 3:
        beats = effects["multitask"] > effects["sgg-dir"]
        assert ("beats" if beats else "matches") in summ["decision"][1]["text"]
    text = fs.render_transfer(summ, {"n_new": 0, "run_min": 0.0}, fs.Config(transfer_ks=(1,)), True)
    assert fs.DECISION_RULE in text and f"(case {case})" in text


def test_transfer_summary_pairs_holm_and_best_transfer():
    import numpy as np

    effects = {"sgg-dir": 0.10, "sgg-all": 0.09, "multitask": 0.04, "sequential": 0.07, "sgg-rand": -0.01}
    recs = _transfer_records(effects, K=1) + _transfer_records(effects, K=2, seed=1)
    recs.append(_rec("multitask", 1, 99, 0.99, spec=fs.spec_key("multitask")))  # an incomplete seed: ignored
    recs.append(_rec("sgg-dir", 1, 0, 0.0, spec="stale", lr=1e-4))               # another spec: ignored
    summ = fs.summarize_transfer(recs, _chosen((1, 2)), fs.Config(transfer_ks=(1, 2)))
    assert summ["best_transfer"] == {1: "sequential", 2: "sequential"}
    comps = summ["comps"]
    assert len(comps) == 14  # 5 vs adamw+clip and 2 vs the best transfer baseline, at each K
    c1 = summ["cells"][1]
    d = np.array(c1["sgg-dir"]["accs"]) - np.array(c1["sequential"]["accs"])
    c = comps[("sgg-dir", "best-transfer", 1)]
    assert c["vs"] == "sequential" and c["mean_diff"] == pytest.approx(d.mean()) and c["n"] == 20
    assert c["perm_p"] == pytest.approx(fs.sign_flip_p(d))
    # Holm over all 14: the adjusted p is at least the raw p, and the smallest is 14 times its raw value (capped)
    ps = sorted((v["perm_p"], v["holm_p"]) for v in comps.values())
    assert all(h >= p for p, h in ps) and ps[0][1] == pytest.approx(min(1.0, 14 * ps[0][0]))
    assert c1["sgg-dir"]["seeds"] == list(range(20))


def test_meanpool_check_pairs_with_the_pooler_runs():
    effects = {"sgg-dir": 0.10, "sgg-all": 0.09, "multitask": 0.04, "sequential": 0.07}
    recs = _transfer_records(effects)
    chosen = _chosen()
    assert fs.meanpool_arms(recs, chosen, 1) == ["sgg-dir", "sgg-all"]
    for a in ("sgg-dir", "sgg-all"):
        name = fs.with_override(a, "pool=mean")
        chosen[(1, a, "mean")] = (name, 2e-4)
        for r in [r for r in recs if r["method"] == a and r["seed"] < 10]:
            recs.append({**r, "method": name, "spec": fs.spec_key(name), "lr": 2e-4, "acc": r["acc"] - 0.05})
    mp = fs.summarize_transfer(recs, chosen, fs.Config(transfer_ks=(1,)))["meanpool"]
    assert mp["arms"] == ["sgg-dir", "sgg-all"] and mp["cells"]["sgg-dir"]["n"] == 10
    assert mp["comps"][("sgg-dir", "pooler")]["mean_diff"] == pytest.approx(-0.05)
    assert len(mp["comps"]) == 3
