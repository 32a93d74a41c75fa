"""Transcript testing for drivers, in the manner of PyMeasure's ``expected_protocol``.

A ``ScriptedTransport`` holds the exact exchange a driver call must produce:
a list of ``(command, answer)`` pairs, ``answer`` None for a write. The
driver under test runs on it unchanged. A command that differs from the next
expected one fails at once (naming both); ``assert_done`` fails if the driver
stopped before sending everything the manual says it must. So a transcript
test catches a wrong command AND a missing one.
"""

from __future__ import annotations

from collections.abc import Iterable


class TranscriptMismatch(AssertionError):
    pass


class ScriptedTransport:
    resource = "transcript"

    def __init__(self, exchanges: Iterable[tuple[str, str | None]]) -> None:
        self._expected = list(exchanges)
        self._position = 0
        self.sent: list[str] = []

    def _next(self, command: str, is_query: bool) -> str | None:
        self.sent.append(command)
        if self._position >= len(self._expected):
            raise TranscriptMismatch(f"unexpected extra command {command!r} (transcript has {len(self._expected)})")
        want, answer = self._expected[self._position]
        self._position += 1
        if command != want:
            raise TranscriptMismatch(f"exchange {self._position}: sent {command!r}, transcript expects {want!r}")
        if is_query != (answer is not None):
            kind = "a query" if answer is not None else "a write"
            raise TranscriptMismatch(f"exchange {self._position}: {command!r} should be {kind}")
        return answer

    def write(self, command: str) -> None:
        self._next(command, False)

    def query(self, command: str) -> str:
        return self._next(command, True) or ""

    def close(self) -> None:
        pass

    def assert_done(self) -> None:
        missing = self._expected[self._position :]
        if missing:
            raise TranscriptMismatch(
                f"driver stopped early: {len(missing)} expected command(s) not sent, first {missing[0][0]!r}"
            )


class ScriptedLineTransport:
    """The same idea for streaming line protocols (MethodSCRIPT): a list of ``(">", line)`` the driver must
    write and ``("<", line)`` the device answers, in order."""

    resource = "transcript"
    timeout_s = 1.0

    def __init__(self, exchanges: Iterable[tuple[str, str]]) -> None:
        self._expected = list(exchanges)
        self._position = 0

    def _next(self, direction: str, text: str | None) -> str:
        if self._position >= len(self._expected):
            raise TranscriptMismatch(
                f"unexpected {'write' if direction == '>' else 'read'} {text!r} past the transcript's end"
            )
        want_direction, want = self._expected[self._position]
        self._position += 1
        if direction != want_direction or (direction == ">" and text != want):
            shown = f"wrote {text!r}" if direction == ">" else "read a line"
            raise TranscriptMismatch(
                f"exchange {self._position}: {shown}, transcript expects {want_direction} {want!r}"
            )
        return want

    def write_line(self, line: str) -> None:
        self._next(">", line)

    def read_line(self, timeout_s: float | None = None) -> str:
        return self._next("<", None)

    def close(self) -> None:
        pass

    def assert_done(self) -> None:
        missing = self._expected[self._position :]
        if missing:
            raise TranscriptMismatch(f"driver stopped early: {len(missing)} exchange(s) left, first {missing[0]!r}")
