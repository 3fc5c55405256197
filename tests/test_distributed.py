"""Distributed SGG (DESIGN §3, issue 6): 2 CPU ranks (gloo on 127.0.0.1), spawned ONCE for this
module; every case runs inside that one group (tests/_dist_cases.py) and each test checks one
case's measurements on both ranks. Bounded: the group is killed after ``SGG_DIST_TIMEOUT``
seconds (default 420) and the unfinished cases fail instead of blocking CI.

References: the same model stepped in ONE process on the concatenated batch (the unsharded run,
same backend). Parameters and optimizer state must agree to 1e-5 after 5 steps; α, β and the
statistics must be bitwise identical on the ranks.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time

import pytest
import torch

import _dist_cases as C
from conftest import CPU_BACKENDS

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

TOL = 1e-5
TIMEOUT = float(os.environ.get("SGG_DIST_TIMEOUT", "420"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(backends: list[str], device: str = "cpu"):
    """Run the cases on 2 spawned ranks; returns ``get(name) -> [rank0 dict, rank1 dict]``."""
    import torch.multiprocessing as mp

    outdir = tempfile.mkdtemp(prefix="sgg_dist_")
    t0 = time.monotonic()
    ctx = mp.start_processes(C.worker, args=(_free_port(), list(backends), outdir, None, device),
                             nprocs=C.WORLD, join=False, start_method="spawn")
    problem = None
    try:
        while not ctx.join(timeout=2):
            if time.monotonic() - t0 > TIMEOUT:
                problem = f"the 2-rank group did not finish within {TIMEOUT:.0f} s (SGG_DIST_TIMEOUT); killed"
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                break
    except Exception as e:  # a worker died outside a case
        problem = f"a worker failed: {e}"
    elapsed = time.monotonic() - t0
    results = []
    for r in range(C.WORLD):
        path = os.path.join(outdir, f"rank{r}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else {})
    print(f"\n[test_distributed] 2-rank group: {elapsed:.1f} s, "
          f"{len(results[0])} cases; slowest: " + ", ".join(
              f"{k} {v['seconds']:.1f}s" for k, v in sorted(results[0].items(),
                                                           key=lambda kv: -kv[1]["seconds"])[:3]))

    def get(name: str) -> list[dict]:
        per_rank = [res.get(name) for res in results]
        if any(r is None for r in per_rank):
            pytest.fail(f"case {name!r} did not finish on every rank: {problem or 'unknown reason'}")
        for rank, r in enumerate(per_rank):
            if not r["ok"]:
                pytest.fail(f"case {name!r} failed on rank {rank}:\n{r['error']}")
        return per_rank

    get.elapsed = elapsed
    return get


@pytest.fixture(scope="module")
def dist_results():
    return _run_group(CPU_BACKENDS)


def _check_equal_to_unsharded(per_rank, state=True):
    for rank, r in enumerate(per_rank):
        assert r["param"] <= TOL, f"rank {rank}: parameters differ from the unsharded run by {r['param']:.3g}"
        assert r["stats"] <= TOL, (f"rank {rank}: last_stats differ from the unsharded run by "
                                   f"{r['stats']:.3g} (relative)")
        if state:
            assert r["state"] <= TOL, f"rank {rank}: optimizer state differs by {r['state']:.3g}"
            assert r["norm_ema"] <= TOL and r["step"] == 0
        assert r["same_out_all_ranks"], f"rank {rank}: α/β/statistics differ between ranks"
        if "same_norm_ema_all_ranks" in r:
            assert r["same_norm_ema_all_ranks"], "norm_ema differs between ranks"


@pytest.mark.parametrize("reference", C.REFERENCES)
@pytest.mark.parametrize("granularity", C.GRANULARITIES)
def test_fsdp2_equals_unsharded(dist_results, backend, granularity, reference):
    """FSDP2 (Shard(0), uneven shards, an empty shard on rank 1), two param groups, all λ > 0."""
    per_rank = dist_results(f"fsdp2/{backend}/{granularity}/{reference}")
    _check_equal_to_unsharded(per_rank)
    for r in per_rank:
        assert r["guidance_active"], "the guidance did nothing: the case would not test it"
        assert r["state_is_dtensor"], "optimizer state must stay DTensor, like torch.optim.AdamW's"
        assert r["all_reduces"] == C.STEPS, "one all-reduce per step on a 1-D mesh"
    assert [0, 3] in per_rank[1]["local_shapes"], "the case must include an empty local shard"
    relative = granularity != "global" or reference == "momentum"  # see _dist_cases.group_settings
    assert all((r["norm_emas"] > 0) == relative for r in per_rank)


def test_fsdp2_without_the_all_reduce_differs(dist_results, backend):
    """Control: with the collective removed (each rank uses its local norms) the run differs —
    so the comparison above can fail."""
    per_rank = dist_results(f"fsdp2_no_reduce/{backend}")
    assert max(r["param"] for r in per_rank) > 1e-3


def test_fsdp2_stats_then_apply_on_the_same_plan(dist_results, backend):
    """The distributed layer keeps the stage order a backend may rely on (stats → apply of one plan)."""
    _check_equal_to_unsharded(dist_results(f"fsdp2_probe/{backend}"))


def test_fsdp2_source_reference(dist_results, backend):
    """set_reference with full plain tensors cuts each rank's shard."""
    _check_equal_to_unsharded(dist_results(f"fsdp2_source/{backend}"))


def test_fsdp2_gradient_guidance(dist_results, backend):
    """GradientGuidance(torch.optim.AdamW) on FSDP2 DTensors (momentum = AdamW's DTensor exp_avg)."""
    _check_equal_to_unsharded(dist_results(f"fsdp2_wrapper/{backend}"))


@pytest.mark.parametrize("shape", ["2x1", "1x2"])
def test_hsdp_replicate_dimension_not_summed(dist_results, backend, shape):
    """2-D mesh (replicate, shard): sum over the shard dimension only. 2x1: the shard dimension has
    size 1, so no collective at all (summing over the replicate one would double the norms)."""
    per_rank = dist_results(f"hsdp/{backend}/{shape}")
    _check_equal_to_unsharded(per_rank)
    assert all(r["all_reduces"] == (0 if shape == "2x1" else C.STEPS) for r in per_rank)


def test_nan_on_one_rank_skips_everywhere(dist_results, backend):
    per_rank = dist_results(f"nan/{backend}")
    for rank, r in enumerate(per_rank):
        assert r["skipped"], f"rank {rank} did not skip"
        assert r["unchanged"], f"rank {rank}: a parameter or state tensor changed in the skipped step"
        assert r["bad_segment_nan"] and r["other_segments_finite"], "last_stats as an unsharded run's"
        assert r["same_out_all_ranks"]
        # afterwards, equal to an unsharded run that skipped the same step
        assert r["param"] <= TOL and r["state"] <= TOL and r["norm_ema"] <= TOL and r["step"] == 0


def test_ddp_needs_nothing(dist_results, backend):
    per_rank = dist_results(f"ddp/{backend}")
    _check_equal_to_unsharded(per_rank)
    assert all(r["all_reduces"] == 0 for r in per_rank), "DDP gradients are whole: no collective"


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_process_group_manual_slices(dist_results, backend, granularity):
    """Each rank holds a row slice of every tensor (one rank an empty one); process_group sums."""
    _check_equal_to_unsharded(dist_results(f"pg/{backend}/{granularity}"), state=False)


def test_process_group_gradient_guidance(dist_results, backend):
    _check_equal_to_unsharded(dist_results(f"pg_wrapper/{backend}"), state=False)


def test_process_group_rank_without_gradients(dist_results, backend):
    """A rank whose plan is empty still joins the collective (else the others would hang)."""
    for r in dist_results(f"pg_idle/{backend}"):
        assert r["sgg"] <= TOL and r["gg"] <= TOL


def test_process_group_is_needed_for_slices(dist_results, backend):
    """Control: the same slices without process_group use local norms and drift away."""
    assert max(r["param"] for r in dist_results(f"pg_no_group/{backend}")) > 1e-3


def test_zero_redundancy_tensor_granularity(dist_results, backend):
    """ZeroRedundancyOptimizer + granularity='tensor': each segment is one whole tensor on one
    rank, so no process_group (and no all-reduce) is needed."""
    per_rank = dist_results(f"zero/{backend}/tensor")
    assert all(r["param"] <= TOL for r in per_rank)
    assert sum(r["owned"] for r in per_rank) == 4 and all(r["owned"] > 0 for r in per_rank)


def test_zero_redundancy_group_granularity_with_process_group(dist_results, backend):
    """granularity='group' spans ranks: process_group (via functools.partial) sums, and a rank
    that owns no tensor of group 1 still takes part (its slot is absent there)."""
    per_rank = dist_results(f"zero/{backend}/group")
    assert all(r["param"] <= TOL for r in per_rank)
    assert sorted(r["group1_owned"] for r in per_rank) == [0, 1]
    # a NaN in the tensor of group 1, read by its owner only: the other rank (which holds no
    # segment of group 1) skips too, and nothing changes anywhere
    for r in dist_results(f"zero/{backend}/group_nan"):
        assert r["skipped"] and r["unchanged"] and r["param"] <= TOL
    assert sorted(r["local_segments"] for r in dist_results(f"zero/{backend}/group_nan")) == [1, 2]
    # control: without process_group each rank would use the norms of its own tensors only
    assert max(r["param"] for r in dist_results(f"zero/{backend}/group_no_pg")) > 1e-3


@pytest.mark.parametrize("dims", ["1d", "2d", "1d_probe"])
def test_mixed_placements_counted_once(dist_results, backend, dims):
    """One global segment of DTensors sharded on different mesh dimensions (Shard(0), Shard(1),
    Replicate, an empty shard, a plain tensor; 2-D: Replicate/Shard mixes): every element counted
    once. ``1d_probe``: the backend's stats() runs on the whole plan last, before its apply()."""
    _check_equal_to_unsharded(dist_results(f"mixed/{backend}/{dims}"), state=False)


def test_errors(dist_results, backend):
    per_rank = dist_results(f"errors/{backend}")
    for r in per_rank:
        assert "Partial" in r["partial"] and r["partial_unchanged"]
        assert "Drop process_group" in r["dtensor_with_group"]
        assert "disagree about the segment layout" in r["layout"]
        assert "set_optimizer_state_dict" in r["plain_state"] and r["plain_state_unchanged"]
    assert per_rank[0]["not_member"] == "no error"
    assert "not a member" in per_rank[1]["not_member"]


def test_checkpoint_round_trip(dist_results, backend):
    """get/set_optimizer_state_dict + torch.distributed.checkpoint save/load keep training
    identical; the full (gathered) optimizer state equals the unsharded run's."""
    for r in dist_results(f"checkpoint/{backend}"):
        assert r["full_state"] <= TOL
        assert set(r["full_state_keys"]) == {"step", "exp_avg", "exp_avg_sq", "ref"}
        assert r["loaded_state"] == 0.0 and r["loaded_state_is_dtensor"]
        assert r["n_nu"] >= 1 and r["loaded_nu"] == 0.0, "the per-segment norm_ema must round-trip"
        assert r["continued"] == 0.0


def test_process_group_argument_validation():
    """Single process: a wrong type or an uninitialised torch.distributed is a clear error."""
    from sgg_fast import GradientGuidance, SGGAdamW

    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="ProcessGroup"):
        SGGAdamW([p], process_group="world")
    with pytest.raises(TypeError, match="ProcessGroup"):
        GradientGuidance(torch.optim.SGD([p], lr=0.1, momentum=0.9), process_group=3)
    with pytest.raises(ValueError, match="not a member"):
        SGGAdamW([p], process_group=torch.distributed.GroupMember.NON_GROUP_MEMBER)
    if not torch.distributed.is_initialized():
        pg = torch.distributed.ProcessGroup.__new__(torch.distributed.ProcessGroup)
        with pytest.raises(RuntimeError, match="init_process_group"):
            SGGAdamW([p], process_group=pg)


def _cuda_backends() -> list[str]:
    from sgg_fast import SGGAdamW
    from sgg_fast.backends import all_backends
    from sgg_fast.plan import build_plan

    p = torch.zeros(3, device="cuda", requires_grad=True)
    p.grad = torch.zeros_like(p)
    plan = build_plan(SGGAdamW([p]).param_groups)
    return [n for n, b in all_backends().items() if not b.not_supported_reasons(plan)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_process_group_all_backends():
    """On the GPU machine: CUDA tensors, every CUDA backend, statistics summed across 2 ranks
    (gloo, one GPU) equal the unsharded run on the same GPU."""
    backends = _cuda_backends()
    get = _run_group(backends, device="cuda")
    for b in backends:
        for name in (f"cuda_pg/{b}/tensor", f"cuda_pg/{b}/global", f"cuda_pg_wrapper/{b}"):
            _check_equal_to_unsharded(get(name), state=False)
