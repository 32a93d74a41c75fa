"""The channel agent next to the instrument: runs steps, enforces safety on every reading, streams documents.

``from labtwin.agent import Agent`` is the public entry; the modules split its jobs (see service.py).
"""

from labtwin.agent.service import Agent

__all__ = ["Agent"]
