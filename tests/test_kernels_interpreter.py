"""Every Triton kernel matches its torch reference under TRITON_INTERPRET=1 (forward and backward, fp32 and bf16,
odd shapes, poisoned buffers). The cases live in tests/_kernels_interp.py and run in one fresh subprocess (one
interpreter start-up for all kernels), because the interpreter must be switched on before @triton.jit decorates the
kernels and another test module may already have imported them in this process; each kernel's test here checks the
cases whose name holds `test_<kernel>_` (what `pytest -k test_<kernel>_` selects) in that run's JUnit report."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
KERNELS = ["rmsnorm", "rope", "relu2", "softcap_ce", "newton_schulz"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """{case name: outcome ("passed", "failed: ...", "skipped")} of one run of tests/_kernels_interp.py."""
    report = tmp_path_factory.mktemp("interp") / "junit.xml"
    env = dict(os.environ, TRITON_INTERPRET="1", MEGACHAT_TRITON="1", OMP_NUM_THREADS="1",
               TRITON_DEFAULT_FP_FUSION="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::UserWarning",
           f"--junitxml={report}", str(TESTS / "_kernels_interp.py")]
    res = subprocess.run(cmd, env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=540)
    assert report.is_file(), f"{' '.join(cmd)} wrote no report:\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    out = {}
    for case in ET.parse(report).iter("testcase"):
        bad = [c for c in case if c.tag in ("failure", "error", "skipped")]
        out[case.get("name")] = "passed" if not bad else f"{bad[0].tag}: {(bad[0].text or '')[-3000:]}"
    out["_log"] = res.stdout[-6000:] + res.stderr[-3000:]
    return out


@pytest.mark.timeout(580)
@pytest.mark.parametrize("kernel", KERNELS)
def test_triton_kernel_matches_reference_in_interpreter(cases, kernel):
    mine = {name: outcome for name, outcome in cases.items() if f"test_{kernel}_" in name}
    assert mine, f"no case of {kernel} ran:\n{cases['_log']}"
    failed = {name: outcome for name, outcome in mine.items() if outcome != "passed"}
    assert not failed, "\n".join(f"{name}: {outcome}" for name, outcome in failed.items())
    assert len(mine) < len(cases) - 1  # the other kernels' cases ran too and are not counted as this one's
