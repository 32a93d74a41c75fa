"""Alerts that reach people: rules over the bus's documents, sent to webhooks, e-mail and the dashboard.

``config``: the lab file's ``alerts:`` (destinations and rules); ``engine``: which documents fire which alerts,
de-duplicated and rate-limited, without I/O; ``senders``: webhook, SMTP with STARTTLS, and the dashboard's
in-memory feed; ``service``: the bus subscriber that puts them together (`labtwin alerts watch`). docs/alerts.md.
"""

from labtwin.alerts.config import AlertRule, AlertsConfig, EmailDestination, WebhookDestination
from labtwin.alerts.engine import Alert, AlertEngine, run_link
from labtwin.alerts.senders import AlertFeed, EmailSender, SendError, WebhookSender, make_sender
from labtwin.alerts.service import AlertService, Dispatcher

__all__ = [
    "Alert",
    "AlertEngine",
    "AlertFeed",
    "AlertRule",
    "AlertService",
    "AlertsConfig",
    "Dispatcher",
    "EmailDestination",
    "EmailSender",
    "SendError",
    "WebhookDestination",
    "WebhookSender",
    "make_sender",
    "run_link",
]
