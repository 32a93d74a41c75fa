"""A labtwin command as bench/data_path.py starts it: under cProfile (--profile), or an agent with another batch size.

    python bench/_launch.py --profile OUT.prof record --store ...      # = labtwin record --store ..., profiled
    python bench/_launch.py --agent-batch-size 1000 agent --channel s00  # = labtwin agent, 1000-sample batches

--agent-batch-size: `labtwin agent` has no option for it (Agent's batch_size, 100); the bench sets Agent's default
to measure what larger batches would give end to end. It changes nothing in labtwin.

--profile:
Python 3.11's cProfile sees only the thread that enabled it, and an agent samples in its step thread while the
recorder writes in asyncio.to_thread workers: every thread the threading module starts gets a profiler of its own
(threading.setprofile; the hook swaps itself for a cProfile.Profile on the thread's first event), and at exit
(SIGINT included: the command's own Ctrl-C path returns, SystemExit is caught here) all of them are merged into
OUT.prof (and the main thread's, the event loop, alone into OUT.main.prof). Each profiler times its thread's CPU (time.thread_time_ns), so a thread blocked in a wait (an idle
executor worker, the event loop in epoll) costs nothing, as it costs no CPU. SIGUSR1 clears every profiler: the
bench sends it when the measured run starts, so imports and start-up are left out. cProfile slows what it
watches (2-3x on this code): the split is what to read, not the rate.
"""

from __future__ import annotations

import cProfile
import pstats
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _new_profile() -> cProfile.Profile:
    return cProfile.Profile(time.thread_time_ns, 1e-9)


def _clear_all(signum: int, frame: object) -> None:
    with _lock:
        for profile in _profiles:
            profile.clear()


def _thread_hook(frame: object, event: str, arg: object) -> None:
    profile = _new_profile()
    with _lock:
        _profiles.append(profile)
    profile.enable()  # replaces this hook for this thread from its next event on


def main() -> None:
    args = sys.argv[1:]
    out: Path | None = None
    while args and args[0].startswith("--"):
        if args[0] == "--profile":
            out, args = Path(args[1]), args[2:]
        elif args[0] == "--agent-batch-size":
            from labtwin.agent.service import Agent

            kwdefaults = Agent.__init__.__kwdefaults__
            assert kwdefaults is not None and "batch_size" in kwdefaults
            kwdefaults["batch_size"] = int(args[1])
            args = args[2:]
        else:
            raise SystemExit(f"unknown option {args[0]}")
    sys.argv = ["labtwin", *args]
    if out is None:
        from labtwin.cli import main as labtwin_main

        labtwin_main()
        return
    threading.setprofile(_thread_hook)
    main_profile = _new_profile()
    _profiles.append(main_profile)
    signal.signal(signal.SIGUSR1, _clear_all)
    main_profile.enable()
    try:
        from labtwin.cli import main as labtwin_main

        labtwin_main()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        main_profile.disable()
        threading.setprofile(None)  # type: ignore[arg-type]
        with _lock:
            pstats.Stats(_profiles[0]).dump_stats(str(out.with_suffix(".main.prof")))  # the event loop's thread
            stats = pstats.Stats(_profiles[0])
            for profile in _profiles[1:]:
                stats.add(profile)
        stats.dump_stats(str(out))


if __name__ == "__main__":
    main()
