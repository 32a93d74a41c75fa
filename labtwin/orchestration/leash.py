"""Run a Python program on a leash: it ends when the process that started it ends, SIGKILL included.

`python -m labtwin.orchestration.leash PARENT_PID -m MODULE ARGS...` (or `... PARENT_PID SCRIPT ARGS...`) starts
a watchdog thread, then runs the module or script in this same interpreter, as ``python -m`` would. The
watchdog polls ``os.getppid()``: when it is no longer PARENT_PID the parent has died (the kernel re-parents an
orphan to PID 1 or a subreaper), so it sends this process SIGTERM (uvicorn shuts down gracefully) and, if that
has not ended it within ``GRACE_S``, SIGKILL. A parent that died before the watchdog started ends the program
before it runs. Why a watchdog and not ``prctl(PR_SET_PDEATHSIG)``: see docs/decisions/0010.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

POLL_S = 0.25
GRACE_S = 5.0


def leashed(command: list[str], parent_pid: int | None = None) -> list[str]:
    """``command`` (``[python, -m, module, ...]`` or ``[python, script, ...]``) run under the leash of
    ``parent_pid`` (this process unless given): the same interpreter, the same arguments."""
    python, *rest = command
    return [python, "-m", __name__, str(os.getpid() if parent_pid is None else parent_pid), *rest]


def _end_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    _end_self()


_watching: set[int] = set()


def start_watchdog(parent_pid: int) -> None:
    """End this process once ``parent_pid`` is no longer its parent (a daemon thread, polling); once per parent."""
    if sys.platform == "win32" or parent_pid in _watching:  # Windows: no re-parenting; a Job object would do (ADR 0010)
        return
    _watching.add(parent_pid)
    threading.Thread(target=_watch, args=(parent_pid,), name="labtwin-leash", daemon=True).start()


def leash_spawned_process() -> None:
    """In a process that multiprocessing spawned (a Prefect Runner's flow-run process), end with the spawner.

    Prefect's Runner starts each flow run with ``multiprocessing`` (spawn) and gives no hook to the command line,
    so the flow leashes its own process when it starts; in any other process this does nothing. A flow-run process
    whose Runner dies while it is still starting (before the flow's first line) ends when its Prefect calls fail."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        start_watchdog(parent.pid)  # a spawner that died already (re-parented now) ends this process at once


_SPAWN_WRAPPER = """#!/bin/sh
# labtwin: every process multiprocessing spawns from {parent} runs on the leash of its spawner (ADR 0010).
exec "{python}" -m labtwin.orchestration.leash "$PPID" "$@"
"""


def leash_multiprocessing() -> None:
    """Every process ``multiprocessing`` spawns from now on (a Prefect Runner's flow-run processes, and the
    resource tracker they share) starts on the leash of the process that spawned it, from its first instruction.

    ``leash_spawned_process`` in the flow covers a flow-run process only once the flow runs; one that its Runner's
    death caught while it was still importing Prefect (seconds on a loaded machine) retried the dead API for
    minutes, and the resource tracker it shares lived on with it. multiprocessing lets the interpreter it starts be
    chosen (``set_executable``) but not its arguments, so the executable is a two-line shell script, private to
    this process, that execs this interpreter under the leash with the spawner's pid (the script's parent)."""
    import atexit
    import multiprocessing
    import shutil
    import stat
    import tempfile

    if sys.platform == "win32":
        return
    folder = tempfile.mkdtemp(prefix="labtwin-leash-")
    wrapper = os.path.join(folder, "python")
    with open(wrapper, "w", encoding="utf-8") as f:
        f.write(_SPAWN_WRAPPER.format(parent=os.getpid(), python=sys.executable))
    os.chmod(wrapper, stat.S_IRWXU)
    multiprocessing.set_executable(wrapper)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


_FLAGS_WITH_VALUE = frozenset({"-W", "-X"})


def _skip_interpreter_flags(argv: list[str]) -> list[str]:
    """multiprocessing puts the spawner's interpreter flags (-W from PYTHONWARNINGS, -X ..., -O, -B) before its
    ``-c``; this interpreter was started with the same environment, so they are dropped here."""
    rest = list(argv)
    while rest and rest[0].startswith("-") and rest[0] not in ("-m", "-c"):
        flag = rest.pop(0)
        if flag in _FLAGS_WITH_VALUE and rest:
            rest.pop(0)
    return rest


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m labtwin.orchestration.leash PARENT_PID (-m MODULE | -c CODE | SCRIPT) ...")
    parent_pid = int(argv[0])
    if sys.platform != "win32" and os.getppid() != parent_pid:
        raise SystemExit(f"labtwin leash: parent {parent_pid} has gone; not starting {argv[1:]}")
    start_watchdog(parent_pid)
    argv = [argv[0], *_skip_interpreter_flags(argv[1:])]
    if argv[1] == "-c":  # multiprocessing's spawn: ``-c 'from multiprocessing.spawn import spawn_main; ...'``
        code, args = argv[2], argv[3:]
        sys.argv = ["-c", *args]
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    elif argv[1] == "-m":
        module, args = argv[2], argv[3:]
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        script, args = argv[1], argv[2:]
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
