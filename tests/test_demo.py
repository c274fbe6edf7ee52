"""`make demo` end to end: ResNet-50 built, reloaded in a fresh process, checked against onnxruntime and timed."""
import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_builds_checks_and_times_resnet50(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kiln.demo"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    errors = [float(e) for e in re.findall(r"fp32 accuracy vs onnxruntime: max abs error \S+, max rel error (\S+),", done.stdout)]
    assert len(errors) == 1 and errors[0] < 1e-3 and "top-1 agrees" in done.stdout  # the demo's own fp32 bound
    assert re.search(r"^kiln fp32 +\d+\.\d+ ms", done.stdout, re.M) and re.search(r"^onnxruntime +\d+\.\d+ ms", done.stdout, re.M)
    assert (tmp_path / "build" / "demo" / "resnet50_fp32.kiln").exists()
