"""exit_without_teardown ends a process as ``sys.exit`` would, minus the interpreter's teardown.

Oracle: what a plain ``sys.exit`` guarantees — the non-daemon threads finish, executors' idle workers are stopped
(not waited on forever), ``atexit`` handlers run, buffered stdout reaches its pipe, the code is the exit status —
observed from outside the process; and the teardown really is skipped (an object's finalizer that the teardown
would run does not run).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROGRAM = textwrap.dedent("""
    import atexit, concurrent.futures, sys, threading, time
    from pathlib import Path
    from switchyard.parallel.process_exit import exit_without_teardown

    out = Path(sys.argv[1])
    def slow_worker():
        time.sleep(0.3)
        (out / "thread").write_text("joined")
    threading.Thread(target=slow_worker).start()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    pool.submit(lambda: None).result()  # an idle, non-daemon worker left waiting for more work
    atexit.register(lambda: (out / "atexit").write_text("ran"))

    class TornDown:
        def __init__(self, path, open=open):  # its own references: the teardown clears the module's names first
            self.path, self.open = str(path), open
        def __del__(self):
            with self.open(self.path, "w") as f:
                f.write("ran")
    keep = TornDown(out / "teardown")  # a module global: only the interpreter's teardown would finalize it
    print("buffered, no newline flush", end="")
    exit_without_teardown(int(sys.argv[2]))
""")


@pytest.mark.parametrize("code", [0, 3])
def test_threads_atexit_and_stdout_are_done_and_the_teardown_is_skipped(tmp_path, code):
    result = subprocess.run([sys.executable, "-c", PROGRAM, str(tmp_path), str(code)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == code, result.stderr
    assert result.stdout == "buffered, no newline flush"
    assert (tmp_path / "thread").read_text() == "joined"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "teardown").exists()


def test_the_same_program_with_sys_exit_does_tear_down(tmp_path):
    """The check above can fail: with ``sys.exit`` the finalizer runs at teardown."""
    program = PROGRAM.replace("exit_without_teardown(int(sys.argv[2]))", "sys.exit(int(sys.argv[2]))")
    result = subprocess.run([sys.executable, "-c", program, str(tmp_path), "0"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "teardown").read_text() == "ran"


def test_an_interpreter_without_threading_shutdown_exits_the_usual_way(tmp_path):
    """``threading._shutdown`` is CPython's (its finalization calls it): where it is missing, the function falls back to
    ``sys.exit`` (the same code, the atexit handlers run, the teardown done: whatever that interpreter's own exit does)
    rather than fail."""
    program = PROGRAM.replace("out = Path(sys.argv[1])", "out = Path(sys.argv[1])\ndel threading._shutdown")
    result = subprocess.run([sys.executable, "-c", program, str(tmp_path), "3"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered, no newline flush"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "teardown").read_text() == "ran"


def test_a_thread_other_than_main_is_refused():
    from switchyard.parallel.process_exit import exit_without_teardown

    errors: list[BaseException] = []

    def call() -> None:
        try:
            exit_without_teardown(0)
        except RuntimeError as err:
            errors.append(err)

    import threading

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])
