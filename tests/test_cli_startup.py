"""`labtwin --help` and `import labtwin.cli` load only typer, rich and labtwin.cli's own small modules.

Each command imports what it uses when it runs (issue 17: `labtwin --help` under 0.2 s; bench/cli_startup.py
measures it). Behaviour, not timing: in a fresh process, importing the CLI, building its typer app into click
commands and rendering the help load none of the heavy packages; the help still lists every command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("prefect", "numpy", "scipy", "sqlalchemy", "matplotlib", "httpx", "pandas", "pyarrow", "pydantic")
"""Packages `labtwin --help` must not import (pydantic: the document and settings models take ~0.1 s to build)."""

# Runs the CLI in this process as the entry point does, then reports which heavy packages it imported.
PROBE = f"""
import json, sys
heavy = {HEAVY!r}
sys.argv = ["labtwin", *sys.argv[1:]]
code = 0
if sys.argv[1:] == ["--import-only"]:
    import labtwin.cli
    import typer.main
    typer.main.get_command(labtwin.cli.app)  # the whole tree of click commands, every sub-app's too
else:
    from labtwin.cli import main
    try:
        main()
    except SystemExit as exit:
        code = exit.code or 0
print(json.dumps({{"code": code, "heavy": [m for m in heavy if m in sys.modules]}}), file=sys.stderr)
"""


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABTWIN_")}
    env["COLUMNS"] = "200"  # rich would fold command names and help at 80 columns off a terminal
    return env


def _probe(tmp_path: Path, *args: str) -> tuple[int, list[str], str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return report["code"], report["heavy"], proc.stdout


def _commands() -> list[str]:
    """The visible command and group names of the root app, as click has them."""
    import typer.main

    from labtwin.cli import app

    group = typer.main.get_command(app)
    ctx = group.make_context("labtwin", ["--help"], resilient_parsing=True)
    return [name for name in group.list_commands(ctx) if not group.get_command(ctx, name).hidden]


def test_importing_the_cli_and_building_its_app_imports_no_heavy_package(tmp_path):
    code, heavy, _ = _probe(tmp_path, "--import-only")
    assert code == 0
    assert heavy == [], f"import labtwin.cli loaded {heavy}: import them inside the command that needs them"


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["run", "--help"],  # a command's help runs the root callback (log redaction, Prefect's defaults) first
        ["dryrun", "--help"],
        ["analyze", "cycling", "--help"],
        ["campaign", "run", "--help"],
    ],
    ids=" ".join,
)
def test_help_and_version_import_no_heavy_package(tmp_path, args):
    code, heavy, out = _probe(tmp_path, *args)
    assert code == 0, out
    if len(args) > 1:  # a command's own help: typer converts its parameters with pydantic (typer._coercion)
        heavy = [m for m in heavy if m != "pydantic"]
    assert heavy == [], f"labtwin {' '.join(args)} loaded {heavy}"
    assert out.strip()


def test_the_entry_point_help_exits_0_and_lists_every_command(tmp_path):
    script = Path(sys.executable).parent / "labtwin"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "labtwin.cli"]
    proc = subprocess.run(
        [*cmd, "--help"], capture_output=True, text=True, timeout=60, env=_env(tmp_path), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    commands = _commands()
    assert {"demo", "dryrun", "run", "agent", "record", "runs", "export", "import", "analyze", "campaign"} <= set(
        commands
    )
    listed = {line.strip(" │|").split(" ")[0] for line in proc.stdout.splitlines() if line.strip(" │|")}
    missing = [name for name in commands if name not in listed]
    assert not missing, f"--help does not list {missing}:\n{proc.stdout}"
    assert "analyse" not in listed  # the hidden British spelling stays hidden
