"""The CUDA kernels (csrc/cuda/kernels.cu) as PTX for sm_90 (the H200), compiled here without a
GPU (nvcc -ptx, the extension's own nvcc flags): the stats/apply/guide kernels move element data
in 16-byte vectors through the global state space (ld.global.nc.v4 for read-only data,
ld/st.global.cg.v4 for data they write), have no generic-space element loads left (a generic
ld.u16/ld.f32 per element was the old code), and finalize, the bitwise mirror of
guidance.finalize, has no FMA although the rest of the file may contract."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "csrc", "cuda", "kernels.cu")


def _nvcc() -> str | None:
    from sgg_fast import _build

    return _build.find_nvcc() or shutil.which("nvcc")


@pytest.fixture(scope="module")
def ptx(tmp_path_factory) -> dict[str, str]:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH or CUDA_HOME): the PTX of csrc/cuda cannot be produced here")
    from torch.utils.cpp_extension import include_paths

    from sgg_fast import _build

    flags = [f for f in _build.nvcc_flags(["90"]) if not f.startswith(("-gencode", "--threads"))]
    out = tmp_path_factory.mktemp("ptx") / "kernels.ptx"
    cmd = [nvcc, "-ptx", "-arch=sm_90", "-std=c++17", *flags, *(f"-I{p}" for p in include_paths()),
           KERNELS, "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, " ".join(cmd) + "\n" + res.stderr[-4000:]
    text = out.read_text()
    # one body per .entry / .func; key: the kernel's name (several instantiations concatenated)
    bodies: dict[str, str] = {}
    for part in re.split(r"^(?:\.visible\s+|\.weak\s+)?\.(?:entry|func)\s+(?:\([^)]*\)\s*)?", text, flags=re.M)[1:]:
        name = part.split("(", 1)[0]
        key = next((k for k in ("stats_kernel", "apply_kernel", "guide_kernel", "finalize_kernel")
                    if k in name), name)
        bodies[key] = bodies.get(key, "") + part
    return bodies


def _count(body: str, pat: str) -> int:
    return len(re.findall(pat, body))


VEC_LD = r"\bld\.global\.(?:nc\.|cg\.)v4\."
VEC_LD_NC = r"\bld\.global\.nc\.v4\."
VEC_ST = r"\bst\.global\.cg\.v4\."
GENERIC_ELEM_LD = r"\bld\.(?:u16|b16|f32|b32|u32)\s"  # no state space: generic addressing


# minimum vector accesses, from the code's variants: 3 dtypes x (stats: g, r, p read-only;
# apply: 3 reference modes x g, m, v, p loaded and m, v, p stored; guide: g, r loaded, g stored)
@pytest.mark.parametrize("kernel,min_ld,min_nc,min_st", [
    ("stats_kernel", 9, 9, 0),
    ("apply_kernel", 36, 9, 27),
    ("guide_kernel", 6, 0, 3),
])
def test_element_data_moves_in_16_byte_vectors(ptx, kernel, min_ld, min_nc, min_st):
    body = ptx[kernel]
    counts = dict(vec_ld=_count(body, VEC_LD), vec_ld_nc=_count(body, VEC_LD_NC), vec_st=_count(body, VEC_ST),
                  generic_ld=_count(body, GENERIC_ELEM_LD))
    assert counts["vec_ld"] >= min_ld and counts["vec_ld_nc"] >= min_nc and counts["vec_st"] >= min_st, counts
    assert counts["generic_ld"] == 0, f"generic-space scalar loads in {kernel}: {counts}"
    # the unaligned fallback (and the tail of a chunk) is still there: global scalar accesses
    assert _count(body, r"\bld\.global\.(?:nc\.|cg\.)?(?:u16|b16|f32|u32|b32)\s") > 0, counts


def test_finalize_has_no_fma_but_the_rest_may_contract(ptx):
    from sgg_fast import _build

    assert "--fmad=false" not in _build.nvcc_flags(["90"])
    assert _count(ptx["apply_kernel"], r"\bfma\.rn\.f32") > 0  # contraction is on in this build
    assert "finalize_kernel" in ptx
    assert _count(ptx["finalize_kernel"], r"\bfma\.rn\.f(?:32|64)") == 0, \
        "FMA in finalize_kernel: a product of finalize_row (sgg_common.h) feeds an addition without mul_nc"
