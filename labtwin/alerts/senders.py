"""Where alerts go: a webhook (JSON POST), e-mail (SMTP with STARTTLS) and the dashboard's in-memory feed.

Every sender raises ``SendError`` with one line that says what went wrong at which destination, never a
traceback: the service logs that line and goes on, ``labtwin alerts test`` prints it. No secret reaches a message:
a webhook is named by its scheme and host (its path is the token), an SMTP password is read from the environment
at the moment of sending and never logged.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import ssl
from collections import deque
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from labtwin.alerts.config import Destination, EmailDestination, WebhookDestination
from labtwin.alerts.engine import Alert


class SendError(Exception):
    """A destination that did not take the alert; the message is one line for the user."""


class Sender(Protocol):
    name: str

    def describe(self) -> str: ...

    async def send(self, alert: Alert) -> None: ...


def _host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


class WebhookSender:
    """An incoming webhook: Slack, Microsoft Teams and Mattermost show ``text``; the other fields are for
    receivers of one's own. A 2xx answer is success, anything else (or no answer) a SendError."""

    def __init__(self, name: str, config: WebhookDestination) -> None:
        self.name = name
        self.config = config

    def _url(self) -> str:
        if self.config.url is not None:
            return self.config.url
        assert self.config.url_env is not None
        url = os.environ.get(self.config.url_env)
        if not url:
            raise SendError(f"environment variable {self.config.url_env} (url_env) is not set")
        return url

    def describe(self) -> str:
        if self.config.url is None:
            return f"webhook ${self.config.url_env}"
        return f"webhook {_host_of(self.config.url)}"

    async def send(self, alert: Alert) -> None:
        url = self._url()
        try:
            async with httpx.AsyncClient(timeout=self.config.timeout_s, follow_redirects=False) as client:
                response = await client.post(url, json=alert.fields())
        except httpx.HTTPError as exc:
            raise SendError(f"{_host_of(url)} did not answer: {type(exc).__name__}: {exc or 'no detail'}") from None
        if not response.is_success:
            body = " ".join(response.text.split())[:200]
            raise SendError(f"{_host_of(url)} answered HTTP {response.status_code}: {body or response.reason_phrase}")


class EmailSender:
    """SMTP submission with STARTTLS (certificate and host name checked) and an optional login. smtplib is
    blocking, so each send runs in a thread: a slow server holds only its own destination's queue."""

    def __init__(self, name: str, config: EmailDestination) -> None:
        self.name = name
        self.config = config

    def describe(self) -> str:
        return f"e-mail via {self.config.host}:{self.config.port} to {', '.join(self.config.to)}"

    def message(self, alert: Alert) -> EmailMessage:
        msg = EmailMessage()
        msg["Subject"] = alert.subject
        msg["From"] = self.config.sender
        msg["To"] = ", ".join(self.config.to)
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain="labtwin")
        lines = [alert.message, "", f"run page: {alert.link}", ""]
        lines += [f"{k}: {v}" for k, v in alert.model_dump(mode="json").items() if k not in ("message", "link")]
        msg.set_content("\n".join(lines) + "\n")
        return msg

    def _password(self) -> str | None:
        if self.config.password_env is None:
            return None
        password = os.environ.get(self.config.password_env)
        if password is None:
            raise SendError(f"environment variable {self.config.password_env} (password_env) is not set")
        return password

    def _tls(self) -> ssl.SSLContext:
        try:
            context = ssl.create_default_context(cafile=str(self.config.ca_file) if self.config.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise SendError(f"ca_file {self.config.ca_file}: cannot be read as PEM CA certificates: {exc}") from None
        return context

    def _send_blocking(self, msg: EmailMessage, password: str | None) -> None:
        c = self.config
        with smtplib.SMTP(c.host, c.port, timeout=c.timeout_s) as smtp:
            smtp.ehlo()
            if c.starttls:
                if not smtp.has_extn("starttls"):
                    raise SendError(f"{c.host}:{c.port} does not offer STARTTLS; the mail was not sent in the clear")
                smtp.starttls(context=self._tls())
                smtp.ehlo()
            if c.username is not None and password is not None:
                smtp.login(c.username, password)
            smtp.send_message(msg)

    async def send(self, alert: Alert) -> None:
        password = self._password()
        msg = self.message(alert)
        where = f"{self.config.host}:{self.config.port}"
        try:
            await asyncio.to_thread(self._send_blocking, msg, password)
        except SendError:
            raise
        except smtplib.SMTPAuthenticationError as exc:
            raise SendError(f"{where} refused the login of {self.config.username}: {exc.smtp_code}") from None
        except smtplib.SMTPException as exc:
            raise SendError(f"{where}: {type(exc).__name__}: {' '.join(str(exc).split())}") from None
        except ssl.SSLError as exc:
            raise SendError(
                f"{where}: TLS failed ({exc.reason or exc}); ca_file: names the CA of a lab's own relay"
            ) from None
        except OSError as exc:
            raise SendError(f"{where} did not answer: {exc.strerror or exc}") from None


def make_sender(name: str, config: Destination) -> Sender:
    if isinstance(config, WebhookDestination):
        return WebhookSender(name, config)
    return EmailSender(name, config)


class AlertFeed:
    """The dashboard's view of alerts: the latest ones in memory, and callbacks for each new one.

    The alert service puts every alert it fires here (whatever the rule's destinations); a dashboard in the same
    process reads ``recent()`` for its page and ``subscribe``s to push new ones to browsers. A callback that
    raises stops neither the feed nor the other callbacks: it is counted in ``callback_errors``."""

    def __init__(self, keep: int = 500) -> None:
        self._alerts: deque[Alert] = deque(maxlen=keep)
        self._listeners: list[Callable[[Alert], None]] = []
        self.callback_errors = 0

    def subscribe(self, listener: Callable[[Alert], None]) -> Callable[[], None]:
        """Call ``listener(alert)`` on the event loop for every new alert; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def publish(self, alert: Alert) -> None:
        self._alerts.append(alert)
        for listener in list(self._listeners):
            try:
                listener(alert)
            except Exception:
                self.callback_errors += 1

    def recent(self, lab: str | None = None, run_id: str | None = None) -> list[Alert]:
        """The alerts kept, oldest first; only a lab's or a run's when asked."""
        return [a for a in self._alerts if (lab is None or a.lab == lab) and (run_id is None or a.run_id == run_id)]
