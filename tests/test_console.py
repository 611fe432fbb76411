"""The `basesearch` console command hands over to the commands of `python -m flows.*`."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from flows import console


def _run(monkeypatch, capsys, *argv):
    """(exit code, stdout, stderr) of `basesearch ARGV` in this process."""
    monkeypatch.setattr(sys, "argv", ["basesearch", *argv])
    with pytest.raises(SystemExit) as exit_:
        console.main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def test_no_command_prints_the_usage_and_an_unknown_one_a_line(monkeypatch, capsys):
    code, out, _ = _run(monkeypatch, capsys)
    assert code == 2 and "search" in out and "rank" in out and "export" in out
    code, _, err = _run(monkeypatch, capsys, "serch")
    assert code == 2 and err.strip() == "error: basesearch: no command 'serch' (search, rank, export, ingest)"


def test_rank_and_export_get_the_rest_of_the_line(monkeypatch, capsys, tmp_path):
    code, _, err = _run(monkeypatch, capsys, "rank", "--judgments", str(tmp_path / "none"), "--out", str(tmp_path))
    assert code == 2 and err.startswith("error: ") and str(tmp_path / "none") in err and "Traceback" not in err
    code, out, _ = _run(monkeypatch, capsys, "export", "--help")
    assert code == 0 and "--merged" in out


@pytest.mark.skipif(shutil.which("basesearch") is None, reason="the package is not installed (pip install -e .)")
def test_the_installed_console_script_runs():
    done = subprocess.run(["basesearch", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "basesearch COMMAND" in done.stdout
