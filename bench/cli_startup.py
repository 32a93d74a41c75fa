"""How long `labtwin --help` takes to start, beside the floors measured in the same run (issue 17: under 0.2 s).

Each figure is the median wall time of ``--runs`` fresh processes, the commands taking turns round by round so
machine load falls on all of them alike (these 2-core machines are noisy: read the ratios):

- ``python -c pass``: the interpreter alone;
- ``python -c "import typer"``: the floor of any typer command line;
- a bare typer app of 25 commands, ``--help``: typer's rich help formatter (rich's markdown, tables, traceback
  modules come with it), the floor of a typer CLI's ``--help``;
- ``python -c "import labtwin.cli"``: labtwin's command modules and the typer app's declarations;
- ``labtwin --help``: the entry point, the app built into click commands, the help rendered.

The children get a bytecode cache of their own (PYTHONPYCACHEPREFIX in a temporary directory, filled by a
warm-up run), as an installed labtwin has one; PYTHONDONTWRITEBYTECODE, which some sessions set, would compile
labtwin's modules from source on every start (``--no-bytecode-cache`` measures that too). It also lists the heavy
packages ``import labtwin.cli`` loads (none, tests/test_cli_startup.py checks it).

    python bench/cli_startup.py              # about 15 s
    python bench/cli_startup.py --runs 15 --no-bytecode-cache
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("prefect", "numpy", "scipy", "sqlalchemy", "matplotlib", "httpx", "pandas", "pyarrow", "pydantic")
TARGET_S = 0.2

BARE_TYPER_APP = """
import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="a bare typer app")
for i in range(25):

    def command(flag: str = typer.Option(None, "--flag", help="a flag")) -> None:
        '''A command.'''

    app.command(name=f"command-{i}")(command)
app()
"""


def labtwin_command() -> list[str]:
    """The installed entry point beside this interpreter, else the module (a tree that was never installed)."""
    script = Path(sys.executable).parent / "labtwin"
    return [str(script)] if script.exists() else [sys.executable, "-m", "labtwin.cli"]


def wall_s(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def child_env(cache_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env["COLUMNS"] = "120"  # the help is rendered the same whatever terminal runs the bench
    env.pop("PYTHONPYCACHEPREFIX", None)
    if cache_dir is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(cache_dir)
    return env


def measure(commands: dict[str, list[str]], env: dict[str, str], runs: int) -> dict[str, float]:
    for cmd in commands.values():  # warm-up: the bytecode cache, the OS's file cache
        wall_s(cmd, env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, cmd in commands.items():
            times[name].append(wall_s(cmd, env))
    return {name: statistics.median(t) for name, t in times.items()}


def heavy_imports(env: dict[str, str]) -> list[str]:
    code = f"import sys, labtwin.cli; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def report(title: str, median: dict[str, float]) -> None:
    floor = median["python -c 'import typer'"]
    print(title)
    for name, t in median.items():
        print(f"  {name:38s} {t * 1e3:6.0f} ms   {t / floor:4.2f}x import typer")
    help_s = median["labtwin --help"]
    cli_s = median["python -c 'import labtwin.cli'"]
    verdict = "met" if help_s < TARGET_S else f"not met by {(help_s - TARGET_S) * 1e3:.0f} ms"
    print(
        f"  labtwin --help {help_s:.3f} s (target < {TARGET_S} s: {verdict}); "
        f"{(help_s - median['bare typer app --help']) * 1e3:+.0f} ms beside a bare typer app's --help, "
        f"{(cli_s - floor) * 1e3:+.0f} ms of labtwin.cli beyond import typer"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="processes per command (the median is printed)")
    parser.add_argument("--no-bytecode-cache", action="store_true", help="also measure with PYTHONDONTWRITEBYTECODE=1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="labtwin-bench-cli-") as tmp:
        bare = Path(tmp) / "bare_typer_app.py"
        bare.write_text(BARE_TYPER_APP, encoding="utf-8")
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import typer'": [sys.executable, "-c", "import typer"],
            "bare typer app --help": [sys.executable, str(bare), "--help"],
            "python -c 'import labtwin.cli'": [sys.executable, "-c", "import labtwin.cli"],
            "labtwin --help": [*labtwin_command(), "--help"],
        }
        env = child_env(Path(tmp) / "pycache")
        help_text = subprocess.run(commands["labtwin --help"], env=env, capture_output=True, text=True, check=True)
        assert "dryrun" in help_text.stdout and "campaign" in help_text.stdout, help_text.stdout
        report(f"wall time, median of {args.runs} runs each, bytecode cached:", measure(commands, env, args.runs))
        if args.no_bytecode_cache:
            report(
                f"wall time, median of {args.runs} runs each, PYTHONDONTWRITEBYTECODE=1 (labtwin compiled each start):",
                measure(commands, child_env(None), args.runs),
            )
        heavy = heavy_imports(env)
        print(
            f"heavy packages `import labtwin.cli` loads: {', '.join(heavy) if heavy else 'none'} (of {', '.join(HEAVY)})"
        )


if __name__ == "__main__":
    main()
