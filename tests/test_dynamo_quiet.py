"""``import sgg_fast`` inside a compiled region (the backend registry discovered there) and a
compiled first ``opt.step`` (the compiled extension found and loaded from inside the trace) must
not make Dynamo trace file-system builtins: no "Dynamo does not know how to trace the builtin
`posix.stat`" warning (sgg_fast._ext runs those parts eagerly). One fresh process, so that
nothing is discovered or loaded before the compiled code runs."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CODE = """
import sys, warnings, torch
warnings.simplefilter("always")

def traced_warnings(fn, *args):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args)
    return out, [str(w.message) for w in caught
                 if "does not know how to trace" in str(w.message) or "posix" in str(w.message)]

# 1. import sgg_fast (and list the backends: registry discovery, cheap extension checks) inside
def f(x):
    import sgg_fast
    return x + len(sgg_fast.available_backends())

out, bad = traced_warnings(torch.compile(f, backend="eager"), torch.zeros(2))
assert not bad, ("import", bad)
from sgg_fast import _ext, backends
assert backends._loaded and float(out[0]) >= 1
assert not _ext.loaded()

# 2. the first step compiled (backend auto: the compiled extension when it is built)
import sgg_fast
p = torch.nn.Parameter(torch.linspace(-1, 1, 8)); p.grad = torch.linspace(0.5, -0.5, 8)
q = torch.nn.Parameter(p.detach().clone()); q.grad = p.grad.clone()
opt = sgg_fast.SGGAdamW([p], lr=0.1)
_, bad = traced_warnings(torch.compile(opt.step, backend="eager"))
assert not bad, ("step", bad)
name = opt._engine._resolved.name
assert (name == "cpu") == _ext.loaded(), (name, _ext.loaded())
ref = sgg_fast.SGGAdamW([q], lr=0.1, backend=name)
ref.step()
torch.testing.assert_close(p, q, rtol=0, atol=0)

# 3. the premise: tracing a directory listing does give the warning looked for
import pkgutil, os
def g(x):
    list(pkgutil.iter_modules([os.path.dirname(torch.__file__)]))
    return x + 1
_, bad = traced_warnings(torch.compile(g, backend="eager"), torch.ones(2))
assert bad, "the detector saw nothing"
print("OK", name)
"""


def test_import_and_first_step_inside_compile_are_quiet():
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr[-4000:]
    from sgg_fast.backends import all_backends
    if not all_backends()["cpu"].unavailable_reasons():
        assert "OK cpu" in res.stdout, res.stdout  # the extension path was exercised
