"""No name in the checkout shadows an installed distribution (kernels/README.md).

With the checkout root on ``sys.path`` (pytest, ``python -m benchmarks.…``, a notebook opened in
the root), a regular package or a module at the top level of the checkout would be found before
site-packages. Hugging Face's ``kernels`` (required by transformers ≥ 5.25) owns the name
``kernels``, so this project's ``kernels/`` must stay a folder without ``__init__.py``: a PEP 420
namespace portion, which loses to a regular package anywhere on ``sys.path``.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter: prints where `kernels` and `sgg_fast.kernels` resolve from, with the
# checkout root (argv[1]) first on sys.path, as `python -m ...` in the root puts it.
PROBE = r"""
import importlib, json, sys
sys.path.insert(0, sys.argv[1])
out = {}
k = importlib.import_module("kernels")
out["kernels_file"] = getattr(k, "__file__", None)
out["kernels_path"] = [str(p) for p in getattr(k, "__path__", [])]
if sys.argv[2] == "full":
    import sgg_fast.kernels.layout as L
    import sgg_fast.kernels.launches as LL
    out["layout_file"] = L.__file__
    out["launches_file"] = LL.__file__
print(json.dumps(out))
"""


def _probe(root: str, cwd: str, mode: str = "full", env_extra: dict | None = None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    r = subprocess.run([sys.executable, "-c", PROBE, root, mode], cwd=cwd, capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def _top_level_importables(root: str) -> dict[str, str]:
    """Names a Python with ``root`` first on sys.path imports from the checkout as a regular
    package (a folder with ``__init__.py``) or a module (``*.py``), with their kind."""
    names = {}
    for entry in os.listdir(root):
        full = os.path.join(root, entry)
        if entry.startswith(".") or not entry.isidentifier() and not entry.endswith(".py"):
            continue
        if os.path.isdir(full) and os.path.isfile(os.path.join(full, "__init__.py")):
            names[entry] = "package"
        elif entry.endswith(".py") and os.path.isfile(full):
            names[entry[:-3]] = "module"
    return names


def test_no_regular_top_level_name_is_an_installed_distributions():
    installed = md.packages_distributions()
    names = _top_level_importables(ROOT)
    assert "sgg_fast" in names and "kernels" not in names, names  # premise: the scan sees packages
    clashes = {n: installed[n] for n in names if n != "sgg_fast" and n in installed}
    assert not clashes, (f"top-level names of the checkout that installed distributions also provide: "
                         f"{clashes}; rename them or make them non-importable (kernels/README.md)")


def _hf_kernels_installed() -> bool:
    return "kernels" in md.packages_distributions().get("kernels", [])


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_kernels_is_hugging_faces_and_sgg_fast_kernels_is_ours(where, tmp_path):
    if not _hf_kernels_installed():
        pytest.skip("Hugging Face's kernels distribution is not installed (transformers >= 5.25 pulls it in)")
    cwd = ROOT if where == "root" else str(tmp_path)
    out = _probe(ROOT, cwd)
    hf_dir = os.path.dirname(md.distribution("kernels").locate_file("kernels/__init__.py"))
    assert out["kernels_file"] is not None
    assert os.path.samefile(os.path.dirname(out["kernels_file"]), hf_dir), out
    assert os.path.samefile(out["layout_file"], os.path.join(ROOT, "kernels", "layout.py")), out
    assert os.path.samefile(out["launches_file"], os.path.join(ROOT, "kernels", "launches.py")), out


def test_probe_sees_shadowing_by_a_regular_package(tmp_path):
    """The probe's premise: the same layout with a ``kernels/__init__.py`` (the defect) shadows
    Hugging Face's package, and the probe reports it."""
    if not _hf_kernels_installed():
        pytest.skip("Hugging Face's kernels distribution is not installed")
    (tmp_path / "kernels").mkdir()
    shutil.copy(os.path.join(ROOT, "kernels", "launches.py"), tmp_path / "kernels" / "launches.py")
    (tmp_path / "kernels" / "__init__.py").write_text("")
    out = _probe(str(tmp_path), str(tmp_path), mode="bare")
    assert os.path.samefile(out["kernels_file"], tmp_path / "kernels" / "__init__.py"), out


def test_kernels_without_hugging_face_is_not_this_projects_code(tmp_path):
    """Where no distribution provides ``kernels``, the checkout's folder is an empty namespace and
    each of its modules refuses the name ``kernels.<module>``, naming ``sgg_fast.kernels``."""
    # an interpreter that sees the checkout root and the standard library only
    code = (
        "import sys; sys.path[:] = [sys.argv[1]] + [p for p in sys.path if 'site-packages' not in p]\n"
        "import kernels\n"
        "assert getattr(kernels, '__file__', None) is None, kernels.__file__\n"
        "assert [str(p) for p in kernels.__path__] == [sys.argv[1] + '/kernels'], list(kernels.__path__)\n"
        "bad = []\n"
        "for name in ('layout', 'launches', 'stats', 'apply'):\n"
        "    try:\n"
        "        __import__('kernels.' + name)\n"
        "        bad.append(name)\n"
        "    except ImportError as e:\n"
        "        assert 'sgg_fast.kernels' in str(e), e\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-S", "-c", code, ROOT], cwd=str(tmp_path), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr


TRAINER = r"""
import sys, tempfile
sys.path.insert(0, sys.argv[1])
import torch
import transformers
from transformers import Trainer, TrainingArguments

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
    def forward(self, x=None, labels=None):
        logits = self.lin(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

data = [{"x": torch.randn(4), "labels": torch.tensor(i % 2)} for i in range(8)]
with tempfile.TemporaryDirectory() as d:
    args = TrainingArguments(output_dir=d, per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no", logging_strategy="no")
    from sgg_fast.integrations.transformers import create_sgg_optimizer
    t = Trainer(model=Tiny(), args=args, train_dataset=data)
    t.train()
import kernels
print("trained", transformers.__version__, kernels.__file__)
"""


def test_transformers_trainer_builds_from_the_checkout_root():
    pytest.importorskip("transformers")
    r = subprocess.run([sys.executable, "-c", TRAINER, ROOT], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("trained"), r.stdout
