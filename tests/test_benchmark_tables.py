"""The benchmark tables in docs/benchmarks.md are the ``--markdown`` output of their
scripts on the saved JSON, line for line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def rendered(script: str, *args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, script, "--markdown", *args],
        cwd=ROOT / "benchmarks",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.parametrize(
    "script, args, rows",
    [
        ("sparse_speed.py", ["sparse_speed.json", "--dense", "dnc_largest_n.json"], 11),
        ("sparse_long_episode.py", ["sparse_long_episode.json"], 2),
    ],
)
def test_the_docs_table_is_the_script_s_rendering_of_its_saved_run(script, args, rows):
    """The table and the comparisons under it, as the page shows them."""
    block = rendered(script, *args)
    assert len([line for line in block if line.startswith("|")]) == rows + 2
    page = (ROOT / "docs/benchmarks.md").read_text().splitlines()
    start = page.index(block[0])
    assert page[start : start + len(block)] == block


def test_the_table_holds_the_saved_numbers(tmp_path: Path):
    report = {
        "results": {
            "episodic": dict(
                timed_chunks=5,
                chunk=1000,
                step_ms=4.5,
                search_ms=1.25,
                index_update_ms=0.5,
                peak_rss_mb=600,
            ),
            "long": dict(
                steps=100000,
                chunk=1000,
                step_ms=9.75,
                search_ms=5.5,
                index_update_ms=0.75,
                peak_rss_mb=1234,
            ),
        },
        "long_over_episodic_step_time": 2.1667,
        "long_peak_over_episodic_peak_mb": 634,
        "twice_the_memory_tensor_mb": 256.0,
    }
    saved = tmp_path / "long.json"
    saved.write_text(json.dumps(report))
    lines = rendered("sparse_long_episode.py", str(saved))
    assert lines[2] == "| episodic, 5 x 1,000 steps | 4.5 ms | 1.25 ms | 0.5 ms | 600 MB |"
    assert lines[3] == "| long, 100,000 steps | 9.75 ms | 5.5 ms | 0.75 ms | 1,234 MB |"
    assert "- long over episodic step time: 2.17" in lines
    assert "- long peak over episodic peak: 634 MB (twice the memory tensor: 256 MB)" in lines
