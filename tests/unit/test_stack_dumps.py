"""`kill -USR1` on a process with the plugin loaded prints every thread's stack and
leaves the process running (plugin.stack_dumps_on_sigusr1)."""
import signal
import subprocess
import sys
import time

CHILD = r"""
import threading, time, sys
from vllm_kvflow.plugin import stack_dumps_on_sigusr1

def stalled_worker():
    time.sleep(30)

assert stack_dumps_on_sigusr1()
assert not stack_dumps_on_sigusr1()  # a handler is set now: left alone
threading.Thread(target=stalled_worker, daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:  # "again" after the dump: the process lived through it
    print("alive", flush=True)
    break
"""


def test_sigusr1_dumps_every_thread_and_the_process_goes_on():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.2)  # the worker thread is inside its sleep
        child.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        child.stdin.write("again\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "alive"
        _, err = child.communicate(timeout=10)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert "stalled_worker" in err  # the other thread's frame
    assert "Current thread 0x" in err and "<module>" in err  # and the main thread's
