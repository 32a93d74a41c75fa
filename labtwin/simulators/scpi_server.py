"""The TCP side of the SCPI emulators: one asyncio server per emulated instrument, and a thread to run it in.

Faults (set on the emulator, for tests): ``fault`` is ``"silent"`` (reads
commands and never answers), ``"garbage"`` (answers every query with noise)
or ``"close"`` (drops the connection at the next command);
``fault_after_queries`` arms it after N more queries, so it strikes mid-step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from typing import Any, Protocol

from labtwin.devices import scpi


class ScpiInstrument:
    """What every SCPI emulator shares: the error queue, the command log, the fault settings, and ``handle``
    (one program message: each command executed in turn, a bad one queued as an error and skipped).
    Subclasses implement ``_execute(command)`` as their manual's dispatch table."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fault: str | None = None
        self.fault_after_queries: int | None = None
        self.commands_seen: list[str] = []
        self.answered_reads: list[tuple[float, float]] = []
        self.errors: deque[tuple[int, str]] = deque(maxlen=32)

    def _execute(self, command: scpi.Command) -> str | None:
        raise NotImplementedError

    def next_error(self) -> tuple[int, str]:
        return self.errors.popleft() if self.errors else (0, "No error")

    def handle(self, line: str) -> str | None:
        """Execute one line; the joined answers of its queries, or None if it had none."""
        with self.lock:
            self.commands_seen.append(line)
            try:
                commands = scpi.parse_line(line)
            except scpi.ScpiError as exc:
                self.errors.append((exc.code, exc.message))
                return None
            answers = []
            for command in commands:
                try:
                    answer = self._execute(command)
                except scpi.ScpiError as exc:
                    self.errors.append((exc.code, exc.message))
                    continue
                if answer is not None:
                    answers.append(answer)
            return ";".join(answers) if answers else None


class ScpiServer:
    """An SCPI emulator (anything with ``handle(line)`` and the fault attributes) on a TCP port, as an
    instrument's raw socket port serves it: newline-terminated program messages in, answers out."""

    def __init__(self, emulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator = emulator
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> ScpiServer:
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        emulator = self.emulator
        try:
            while True:
                raw = await reader.readline()
                if not raw:
                    break
                line = raw.decode(errors="replace").strip()
                if not line:
                    continue
                if emulator.fault_after_queries is not None and "?" in line:
                    emulator.fault_after_queries -= 1
                armed = emulator.fault is not None and (
                    emulator.fault_after_queries is None or emulator.fault_after_queries < 0
                )
                if armed and emulator.fault == "close":
                    break
                answer = await asyncio.get_running_loop().run_in_executor(None, emulator.handle, line)
                if armed and emulator.fault == "silent":
                    continue
                if armed and emulator.fault == "garbage" and answer is not None:
                    answer = "#?\x15garbage"
                if answer is not None:
                    writer.write((answer + "\n").encode())
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await self._server.wait_closed()

    async def serve_forever(self) -> None:
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()


class EmulatorServer(Protocol):
    """What the thread needs of a server: SCPI's here, or the EmStat's MethodSCRIPT one."""

    port: int

    async def start(self) -> Any: ...

    async def stop(self) -> None: ...


class ScpiEmulatorThread:
    """Runs an emulator's server (SCPI by default) in a background thread with its own event loop: for tests."""

    def __init__(self, emulator, port: int = 0, server_class: type[EmulatorServer] | None = None) -> None:
        self.emulator = emulator
        self._port = port
        self._server_class: Any = server_class or ScpiServer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="scpi-emulator", daemon=True)
        self._server: EmulatorServer | None = None

    @property
    def server(self) -> EmulatorServer:
        if self._server is None:
            raise RuntimeError("the emulator's server runs only inside `with ScpiEmulatorThread(...)`")
        return self._server

    def __enter__(self) -> ScpiEmulatorThread:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            self._server_class(self.emulator, port=self._port).start(), self._loop
        ).result(10)
        return self

    @property
    def port(self) -> int:
        return self.server.port

    def __exit__(self, *exc) -> None:
        abort = getattr(self.emulator, "abort", None)
        if abort is not None:
            abort()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
