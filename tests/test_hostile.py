"""The hostile-input corpus (tests/hostile.py): every case is refused with exit code 2 and one line.

The corpus is generated at test time (no committed binaries) and run in forked children by
``tests/hostile.py run``. Each case must: exit with code 2; print exactly one line on stderr and no
traceback; leave no ``PWNED`` marker (no payload ran); change no file outside its ``--out``
(inputs byte-identical); stay within MEMORY_BOUND_MB of peak resident memory above a child that
does nothing; and fail within SECONDS_BOUND.
"""

import json
import subprocess
import sys
from pathlib import Path

import hostile
import pytest

MEMORY_BOUND_MB = 256  # peak RSS above the baseline child (which holds torch and ulrl imported: about 250 MB)
SECONDS_BOUND = 10.0
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    for step in ("build", "run"):
        subprocess.run([sys.executable, str(HERE / "hostile.py"), step, str(root)], check=True, timeout=600)
    return {r["name"]: r for r in json.loads((root / "results.json").read_text())}


def test_corpus_covers_the_categories():
    cats = [c for c, _ in hostile.CASES.values()]
    assert len(cats) >= 40
    assert {"pickle", "safetensors", "torch-file", "memory", "sidecar", "paths", "output"} <= set(cats)


@pytest.mark.parametrize("name", list(hostile.CASES))
def test_hostile_case_is_refused(name, results):
    r, base = results[name], results["baseline"]
    err = r["stderr"].strip()
    assert r["exit"] == 2, f"exit {r['exit']}: {err[-500:]}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[-1000:]
    assert err.startswith("ulrl ") and ": error: " in err, err
    assert not r["changed"], f"files changed outside --out: {r['changed']}"
    assert r["peak_mb"] - base["peak_mb"] <= MEMORY_BOUND_MB, f"peak {r['peak_mb']:.0f} MB (baseline {base['peak_mb']:.0f})"
    assert r["peak_mb"] < 1024
    assert r["seconds"] <= SECONDS_BOUND and not r["killed"]
