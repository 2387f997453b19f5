"""Benchmark results carry their own provenance (command, machine, jax, date, commit, source digest)."""

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


def test_every_benchmark_writes_its_results_through_write_result():
    for path in sorted(BENCH.glob("*.py")):
        text = path.read_text()
        if path.name in ("provenance.py", "child_process.py", "plot_results.py"):
            continue
        dumps = [l for l in text.splitlines() if re.search(r"json\.dump\(", l) and "index.json" not in l
                 and "weight_map" not in l]
        assert not dumps, f"{path.name} writes JSON without its provenance: {dumps}"


def test_a_benchmark_result_names_its_command_machine_jax_and_code(tmp_path):
    out = tmp_path / "sim.json"
    subprocess.run([sys.executable, str(BENCH / "scheduler_sim.py"), "--out", str(out)], check=True,
                   capture_output=True, timeout=300, cwd=REPO)
    prov = json.loads(out.read_text())["provenance"]
    assert prov["command"][0] == "scheduler_sim.py" and "--out" in prov["command"]
    assert prov["jax"] and prov["date_utc"].endswith("+00:00") and prov["machine"]["cpus"] >= 1
    assert re.fullmatch(r"[0-9a-f]{16}", prov["source_digest"])
    assert prov["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"])
