"""benchmarks/report.py: what a benchmark records about its run, and what it writes (fast: no engine)."""

import json
import shlex

import pytest
from benchmark_scripts import benchmark_script


@pytest.fixture(scope="module")
def report():
    with benchmark_script("report") as module:
        yield module


def test_command_is_a_shell_quoted_line(report):
    command = report.command_line("/anywhere/benchmarks/load.py", ["kv", "--configs", "h2o_20%", "a b"])
    assert command == "python benchmarks/load.py kv --configs h2o_20% 'a b'"
    assert shlex.split(command)[2:] == ["kv", "--configs", "h2o_20%", "a b"]


def test_run_records_commit_and_cpu(report):
    run = report.Run.start("soak.py", [])
    assert run.command == "python benchmarks/soak.py"
    assert run.commit is None or run.commit.removesuffix("-dirty").isalnum()
    assert "CPUs" in run.cpu
    assert run.record() == {"command": run.command, "commit": run.commit, "cpu": run.cpu}


def test_write_json_markdown_and_plot(report, tmp_path):
    run = report.Run("python benchmarks/x.py --n 2", "abc1234-dirty", "Some CPU, 2 CPUs (avx2)")
    drawn = []
    text = run.write(tmp_path / "out", "x", {"rows": [{"a": 1}]}, "| a |\n|---|\n| 1 |\n", plot=drawn.append)
    saved = json.loads((tmp_path / "out" / "x.json").read_text())
    assert list(saved) == ["command", "commit", "cpu", "rows"]
    assert saved["rows"] == [{"a": 1}] and saved["commit"] == "abc1234-dirty"
    assert (tmp_path / "out" / "x.md").read_text() == text
    assert text == (
        "| a |\n|---|\n| 1 |\n\nProduced by:\n\n    python benchmarks/x.py --n 2\n\n"
        "At commit abc1234-dirty on Some CPU, 2 CPUs (avx2).\n"
    )
    assert drawn == [tmp_path / "out" / "x.png"]


def test_write_a_list_with_records_of_several_runs(report, tmp_path):
    run = report.Run("python benchmarks/p.py", "def5678", "CPU B, 2 CPUs")
    entries = [
        {"config": "a", "command": "python benchmarks/p.py --old"},  # written before commits were recorded
        {"config": "b", **run.record()},
    ]
    text = run.write(tmp_path, "results", entries, "table", md_name="table.md", records=entries)
    assert json.loads((tmp_path / "results.json").read_text()) == entries
    assert (tmp_path / "table.md").read_text() == text
    assert text == (
        "table\n\nProduced by:\n\n    python benchmarks/p.py --old\n    python benchmarks/p.py\n\n"
        "At commit def5678 on CPU B, 2 CPUs.\n"
    )
    assert not (tmp_path / "results.png").exists()
