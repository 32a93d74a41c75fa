"""``python -m labtwin.cli``: the ``labtwin`` command, for a child started on a leash (``labtwin agent --supervise``)."""

from labtwin.cli import main

main()
