"""The web dashboard: watch every channel of a lab live, read a run's plots, and (as an operator) pause,
resume or stop a run, from a browser on any machine that reaches the dashboard.

``live`` is one bus subscriber fanning out to browsers, ``history`` reads the store, ``auth`` holds logins
and sessions, ``app`` is the Starlette app, ``server`` runs it. The page assets are in ``static`` and need no
internet.
"""
