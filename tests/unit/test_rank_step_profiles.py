"""benchmarks/gpu/rank_step_profiles.py: the per-step cProfile dumps of a probe run
(KVFLOW_PROFILE_MODE=python) summed over the slow steps, against the other steps. This
table found the blocking copy that held up every step starting a load on an H200."""
import cProfile
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "rank_step_profiles.py"


def blocking_copy(seconds: float) -> None:  # stands in for the slow call
    time.sleep(seconds)


def queue_work() -> None:  # stands in for the work every step does
    sum(range(1000))


def _step(path: Path, slow: bool) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    queue_work()
    if slow:
        blocking_copy(0.03)
    profiler.disable()
    profiler.dump_stats(str(path))


def test_the_slow_steps_call_is_ranked_first_with_its_time_per_slow_step(tmp_path):
    for i, slow in enumerate([True, False, True, False, False]):
        _step(tmp_path / f"step{i:06d}.prof", slow)
    (tmp_path / "step000000.txt").write_text("the text report beside each dump is ignored")
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--slow-ms", "20"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("5 steps profiled")
    assert "slow steps (>= 20 ms): 2; the others: 3" in out
    rows = [line for line in out.splitlines()
            if line.startswith("| ") and "function" not in line and "---" not in line]
    first = rows[0].strip("| ").split(" | ")
    assert first[0].endswith("blocking_copy")
    assert first[1] == "1.0" and 30.0 <= float(first[2]) < 60.0 and float(first[3]) == 0.0
    work = next(r for r in rows if "queue_work" in r).strip("| ").split(" | ")
    assert work[1] == "1.0" and float(work[3]) > 0.0  # also in the other steps


def test_a_folder_without_dumps_is_an_error(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0 and "no .prof files" in result.stderr
