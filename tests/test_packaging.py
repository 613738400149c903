"""The repository's layout never hides another installed package (issue 20): its kernels/ folder
has no __init__.py, so Hugging Face's `kernels` (which transformers imports) wins even from the
repo root, and no script puts the repo root on the import path."""
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

import tokenprune

ROOT = Path(__file__).resolve().parent.parent


def run_python(args, cwd):
    """stdout of `python ARGS...` run in cwd, as from a shell there ('' or cwd on sys.path)."""
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def hf_kernels_location():
    """The installed Hugging Face `kernels` package's folder, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    init = next((f for f in dist.files or () if str(f).replace("\\", "/") == "kernels/__init__.py"),
                None)
    return Path(dist.locate_file(init)).resolve().parent if init else None


def test_import_kernels_from_the_repo_root_is_hugging_faces():
    installed = hf_kernels_location()
    if installed is None:
        pytest.skip("Hugging Face's kernels package is not installed (transformers < 5.25 does "
                    "not need it)")
    where = run_python(["-c", "import kernels; print(kernels.__file__)"], ROOT).strip()
    assert Path(where).resolve().parent == installed, (
        f"from the repo root, `import kernels` gives {where}, not the installed {installed}")


def test_the_repo_kernels_folder_is_not_a_regular_package():
    # With an __init__.py it would shadow an installed `kernels` whenever the root is on sys.path.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    # tokenprune.kernels is that folder, through a link (setup.py).
    assert (ROOT / "tokenprune" / "kernels").resolve() == ROOT / "kernels"


def test_tokenprune_kernels_imports_from_anywhere(tmp_path):
    code = "import tokenprune.kernels.pipeline as p; print(p.select_and_gather.__module__)"
    for cwd in (tmp_path, ROOT):
        assert run_python(["-c", code], cwd).strip() == "tokenprune.kernels.pipeline"


@pytest.mark.parametrize("script", ["bench/fidelity.py", "bench/mmr_lambda.py",
                                    "tools/train_proxy.py", "bench/vlm_report.py"])
def test_scripts_leave_the_repo_root_off_sys_path(script, tmp_path):
    # Loaded by path from elsewhere, as tests/test_fidelity.py loads bench/fidelity.py.
    code = ("import importlib.util, json, sys\n"
            f"spec = importlib.util.spec_from_file_location('m', {str(ROOT / script)!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "print(json.dumps(sys.path))")
    entries = json.loads(run_python(["-c", code], tmp_path).strip().splitlines()[-1])
    resolved = {(tmp_path / e).resolve() for e in entries}  # "" is the cwd, tmp_path
    assert ROOT not in resolved, f"{script} puts the repo root on sys.path"


def test_python_m_tokenprune_version_from_the_repo_root():
    assert tokenprune.__version__ in run_python(["-m", "tokenprune", "--version"], ROOT)
