"""From the repository root, our kernels/ folder never stands in for Hugging Face's `kernels`.

transformers 5.25 imports `kernels` (CUDAProperties) on its way to T5; when kernels/ held an
`__init__.py`, a Python started in the checkout (pytest, a notebook, the README's snippet)
found our folder first and every DiffSynth FLUX import failed. Each check runs in a fresh
interpreter whose working directory is the repository root, as a user's would be."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import REPO


def _python_in_repo_root(code: str) -> subprocess.CompletedProcess:
    # `python -c` puts the working directory first on sys.path, as `python -m pytest` and Jupyter do.
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_import_kernels_is_not_our_folder():
    out = _ok(_python_in_repo_root(
        "import importlib.util, os\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "paths = [] if spec is None else ([spec.origin] if spec.origin else []) + list(spec.submodule_search_locations or [])\n"
        "if spec is not None: import kernels\n"
        "print(repr([os.path.realpath(p) for p in paths if p]))\n"))
    found = eval(out.strip())
    repo = os.path.realpath(REPO)
    inside = [p for p in found if p == repo or p.startswith(repo + os.sep)]
    assert not inside, f"`import kernels` from the repository root finds the checkout: {inside}"


def test_diffsynth_flux_pipeline_imports_without_artaug_ext():
    _ok(_python_in_repo_root("from diffsynth.pipelines.flux_image import FluxImagePipeline\n"
                             "import sys; assert 'artaug_ext' not in sys.modules"))


def test_artaug_ext_then_t5_and_diffsynth_flux_pipeline():
    _ok(_python_in_repo_root("import artaug_ext\n"
                             "from transformers import T5EncoderModel, T5TokenizerFast\n"
                             "from diffsynth.pipelines.flux_image import FluxImagePipeline\n"
                             "import artaug_kernels; print(artaug_kernels.lora_merge_)"))


@pytest.mark.slow
def test_readme_python_snippet_runs_in_the_checkout(tmp_path):
    """The README's first Python block, pasted into a Python started in the checkout."""
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    snippet = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    assert 'image.save("tiny.png")' in snippet
    out = str(tmp_path / "tiny.png")
    _ok(_python_in_repo_root(snippet.replace('"tiny.png"', repr(out))))
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] > 0 and im.convert("L").getextrema()[0] < im.convert("L").getextrema()[1]
