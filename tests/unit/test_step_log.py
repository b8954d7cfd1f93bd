"""blend/step_log.py: the periodic line of step periods and connector host times."""
import pytest

from vllm_kvflow.blend.step_log import StepLog


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_periods_and_host_times_per_kind_of_step_then_a_fresh_window():
    clock, lines = Clock(), []
    log = StepLog(1.0, clock=clock, emit=lines.append)
    # steps every 20 ms; the first two carry blend work (5 ms, 15 ms), the third none (0.1 ms)
    for host_s, worked in ((0.005, True), (0.015, True), (0.0001, False)):
        started = log.begin()
        clock.now += host_s
        log.end(started, worked)
        clock.now += 0.020 - host_s
    assert lines == []  # 60 ms of a 1 s window
    clock.now += 1.0
    started = log.begin()
    log.end(started, False)
    assert len(lines) == 1
    line = lines[0]
    assert "periods 3, p50 20.0 / p90 1020.0 / max 1020.0 ms" in line
    assert "steps with blend work 2, p50 15.0 / p90 15.0 / max 15.0 ms" in line
    assert "others 2, p50 0.1 / p90 0.1 / max 0.1 ms" in line
    clock.now += 0.5
    log.end(log.begin(), True)
    assert len(lines) == 1  # a new window started with the line
    log.flush()
    assert "periods 1, p50 500.0" in lines[1] and "others none" in lines[1]


def test_off_by_default_costs_nothing_and_logs_nothing():
    lines = []
    log = StepLog(None, emit=lines.append)
    assert not log.enabled
    assert log.begin() is None
    log.end(None, True)
    log.flush()
    assert lines == []


def test_the_setting_is_validated():
    from vllm_kvflow.config import KVFlowConfig

    assert KVFlowConfig().log_steps_every_s is None
    assert KVFlowConfig(log_steps_every_s=2).log_steps_every_s == 2
    for bad in (0, -1, True, "10"):
        with pytest.raises(ValueError, match="log_steps_every_s"):
            KVFlowConfig(log_steps_every_s=bad)


def test_device_allocator_calls_in_steps_with_blend_work():
    """With the allocator's counters, the line counts cudaMalloc / cudaFree made inside
    steps with blend work, and how many slow steps made one; steps without blend work
    are not counted."""
    clock, lines = Clock(), []
    calls = [0, 0]
    log = StepLog(1.0, clock=clock, emit=lines.append, device_calls=lambda: tuple(calls))
    # (host seconds, blend work, mallocs, frees during the step)
    for host_s, worked, mallocs, frees in ((0.003, True, 0, 0), (0.050, True, 8, 0),
                                           (0.030, True, 0, 0), (0.002, True, 1, 1),
                                           (0.001, False, 5, 0)):
        started = log.begin()
        clock.now += host_s
        calls[0] += mallocs
        calls[1] += frees
        log.end(started, worked)
        clock.now += 0.02
    log.flush()
    assert ("cudaMalloc / cudaFree in steps with blend work 9 / 1, in 2 steps; "
            "slow steps (>= 20 ms) 2, 1 of them calling") in lines[0]
    log.end(log.begin(), True)
    log.flush()
    assert "cudaMalloc / cudaFree in steps with blend work 0 / 0, in 0 steps; slow steps (>= 20 ms) 0" in lines[1]


def test_device_calls_only_on_cuda_devices():
    from vllm_kvflow.blend.step_log import device_calls_of

    assert device_calls_of("cpu") is None
    assert "cudaMalloc" not in "".join(_one_line(None))


def _one_line(device_calls):
    clock, lines = Clock(), []
    log = StepLog(1.0, clock=clock, emit=lines.append, device_calls=device_calls)
    log.end(log.begin(), True)
    log.flush()
    return lines
