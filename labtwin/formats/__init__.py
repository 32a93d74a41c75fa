"""The files labtwin reads and writes: cycler exports and its own, each into one ``Recording``.

One module per format (``bdf``, ``biologic``, ``neware``, ``arbin``, ``maccor``, ``landt``, ``labtwin_files``;
``cycler_columns`` holds what the vendor exports share); ``read_recording`` picks the reader from the name and,
where names are shared (``.csv``, ``.txt``, ``.xlsx``), from the header. A reader that meets a file it cannot read names
the file, the column or field, and what it expected (``RecordingError``).
"""

from labtwin.formats.dispatch import read_recording
from labtwin.formats.recording import Recording, RecordingError

__all__ = ["Recording", "RecordingError", "read_recording"]
