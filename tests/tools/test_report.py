"""kiln report: one self-contained HTML page with every chart; headless Chromium renders it with no console errors."""
import os
import re
import shutil
import subprocess

import numpy as np
import onnx
import pytest
from helpers import make_model
from onnx import helper

from kiln.cli import main


def conv_model():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["y"], name="flatten")]
    weights = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) / 5, "b": rng.standard_normal(8).astype(np.float32)}
    return make_model(nodes, {"x": (np.float32, [1, 3, 16, 16])}, ["y"], weights)


@pytest.fixture(scope="module")
def report_page(tmp_path_factory):
    directory = tmp_path_factory.mktemp("report")
    model = directory / "conv.onnx"
    onnx.save(conv_model(), str(model))
    page = directory / "conv.html"
    assert main(["report", str(model), "-o", str(page), "--warmUp", "0", "--iterations", "5", "--duration", "0"]) == 0
    return page


def test_page_holds_every_section_and_fetches_nothing(report_page):
    text = report_page.read_text(encoding="utf-8")
    for heading in ("Build summary", "Latency", "Per-layer time", "Per-layer error against onnxruntime", "Memory"):
        assert f"<h2>{heading}</h2>" in text, heading
    assert text.count("<svg") >= 4  # latency histogram, layer times, layer errors, memory timeline
    assert "PASS" in text and "intermediate tensors that survived fusion are within tolerance" in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text) and "<link" not in text and "@import" not in text


def test_engine_report_without_model_says_why_errors_are_missing(tmp_path, capsys):
    onnx.save(conv_model(), str(tmp_path / "conv.onnx"))
    assert main(["build", str(tmp_path / "conv.onnx"), "--saveEngine", str(tmp_path / "conv.kiln")]) == 0
    assert main(["report", str(tmp_path / "conv.kiln"), "-o", str(tmp_path / "r.html"), "--warmUp", "0", "--iterations", "3",
                 "--duration", "0"]) == 0
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "not compared: give the .onnx model (--model)" in text and "<h2>Per-layer time</h2>" in text
    assert main(["report", str(tmp_path / "conv.kiln"), "--model", str(tmp_path / "conv.onnx"), "-o", str(tmp_path / "r2.html"),
                 "--warmUp", "0", "--iterations", "3", "--duration", "0"]) == 0
    assert "outputs PASS" in capsys.readouterr().out


def chromium_binary() -> str:
    """Debian's chromium, installed with apt-get when absent (as root); skip only when that is impossible."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"installing chromium failed: {' '.join(command)} took over 10 minutes (no package mirror reachable?)")
        if done.returncode != 0:
            pytest.skip(f"installing chromium failed ({' '.join(command)}): {done.stderr.strip()[-300:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH")
    return found


def render(binary: str, page, profile_dir) -> tuple[str, list[str]]:
    """The DOM Chromium built from `page`, and every console message it logged."""
    done = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile_dir}",
                           "--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
def test_chromium_renders_the_report_without_console_errors(report_page, tmp_path):
    binary = chromium_binary()
    dom, console = render(binary, report_page, tmp_path / "profile")
    assert console == [], console
    assert dom.count("<svg") >= 4 and "<h2>Per-layer time</h2>" in dom and "<rect" in dom and "<polyline" in dom
    # The same check catches a broken page: a script error shows up as a console message.
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><body><script>undefined_function();</script></body></html>", encoding="utf-8")
    assert any("undefined_function" in line for line in render(binary, broken, tmp_path / "profile2")[1])
