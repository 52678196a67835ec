"""End a rank process as a normal exit does, minus the interpreter's teardown.

After ``main()`` returns, CPython joins the non-daemon threads, runs the ``atexit`` handlers, then tears the
interpreter down: every module, every object, then C++ static destructors. With torch, deepspeed, transformers and
datasets loaded that teardown alone takes 0.5–1.5 s of a rank's CPU (measured on the CI machine's 2 cores: 1.5 s
from the last ``atexit`` handler to ``exit_group`` in a finished fine-tune), and it is where gloo's worker threads
can still hold tensors whose release needs the GIL of an interpreter being destroyed: the process then aborts
("terminate called without an active exception", pytorch#179291) after its work is done, and the launcher reports a
failed rank. Scripts that ran under a launcher end with :func:`exit_without_teardown` instead.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_without_teardown(code: int | None) -> NoReturn:
    """Join the non-daemon threads (and run ``threading``'s own exit hooks, which stop executors' workers), run the
    ``atexit`` handlers (logging's flush among them), flush stdio, then ``os._exit(code)``; ``None`` is 0, as for
    ``sys.exit``."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("exit_without_teardown must be called from the main thread, as sys.exit would end it")
    shutdown = getattr(threading, "_shutdown", None)  # what Py_FinalizeEx calls first: threading's exit hooks, then
    if shutdown is None:  # a join of every non-daemon thread; an interpreter without it exits the usual way
        sys.exit(code)
    shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe whose reader left: nothing more can be said there
            pass
    os._exit(0 if code is None else int(code))
