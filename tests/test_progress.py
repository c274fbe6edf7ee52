"""The progress bar draws on a terminal and stays silent in CI and pipes."""
import io
import sys

from kiln.progress import Progress, interactive


def test_silent_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not interactive()
    with Progress("build", total=2) as bar:
        bar.advance("a")
    assert sys.stderr.getvalue() == ""


def test_draws_when_enabled(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with Progress("build", total=2, enabled=True) as bar:
        bar.advance("parsed")
    assert "build [" in sys.stderr.getvalue() and "1/2" in sys.stderr.getvalue() and "parsed" in sys.stderr.getvalue()
