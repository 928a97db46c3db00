"""The top-level ``kernels/`` folder must not shadow Hugging Face's ``kernels`` package.

transformers (5.2x) depends on ``kernels`` and imports it while importing
``transformers.activations``. ``python -m pytest`` and ``python -m benchmarks...`` put the
repository root first on ``sys.path``: a ``kernels/__init__.py`` there made our folder the
package transformers found, and every model import failed with
``cannot import name 'CUDAProperties' from 'kernels'``. Without ``__init__.py`` the folder is
at most a namespace portion, which a real installed package always wins over.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_folder_is_no_regular_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()


def test_transformers_models_import_from_the_repository_root():
    code = ("from transformers import LlamaConfig\n"
            "import vramplan_kernels.nf4, vramplan_kernels.rope\n"
            "import importlib.util, pathlib\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "origin = spec.origin if spec is not None else None\n"
            "assert spec is None or origin is None or 'site-packages' in origin or 'dist-packages' in origin, origin\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
