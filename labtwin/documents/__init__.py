"""Every document that travels on labtwin's bus or lands in its store, and its codec.

Sign convention, the same in every file format labtwin reads or writes:
**positive current charges the cell**. Import documents from here; the
sub-modules group them by who sends them.
"""

from labtwin.documents.base import *  # noqa: F403
from labtwin.documents.codec import *  # noqa: F403
from labtwin.documents.commands import *  # noqa: F403
from labtwin.documents.data import *  # noqa: F403
from labtwin.documents.limits import *  # noqa: F403
from labtwin.documents.status import *  # noqa: F403
from labtwin.documents.steps import *  # noqa: F403
from labtwin.documents.twin import *  # noqa: F403
