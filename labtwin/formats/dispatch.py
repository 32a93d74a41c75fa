"""Which reader a file gets: by its name, and for a shared suffix (.csv, .parquet) by its header."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

from labtwin.formats.bdf import is_bdf_header, read_bdf
from labtwin.formats.biologic import read_mpr
from labtwin.formats.labtwin_files import read_labtwin_csv, read_labtwin_parquet
from labtwin.formats.neware import read_neware
from labtwin.formats.recording import Recording, RecordingError

READS = ".mpr (EC-Lab), .nda and .ndax (Neware), BDF (.bdf, .bdf.csv, .bdf.parquet, .csv, gzip), labtwin's samples.csv or .parquet export"


def _csv_header(path: Path) -> list[str]:
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", newline="") as fh:
            for row in csv.reader(fh):
                if row and not row[0].startswith("#"):
                    return row
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as exc:
        raise RecordingError(f"{path}: not a readable text table ({exc})") from None
    raise RecordingError(f"{path}: empty: no header row")


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except Exception as exc:
        raise RecordingError(f"{path}: not a readable Parquet file ({exc})") from None


def read_recording(path: str | Path) -> Recording:
    path = Path(path)
    if path.is_dir():
        path = path / "samples.csv"
    if not path.exists():
        raise RecordingError(f"{path}: no such file")
    name = path.name.lower()
    plain = name[:-3] if name.endswith(".gz") else name
    if plain.endswith(".mpr"):
        return read_mpr(path)
    if plain.endswith((".nda", ".ndax")):  # Neware's own binaries: read as they are, not gzipped
        if name.endswith(".gz"):
            raise RecordingError(f"{path}: a Neware file is read as the cycler wrote it: gunzip it first")
        return read_neware(path)
    if plain.endswith((".bdf", ".bdf.csv", ".bdf.parquet")):
        return read_bdf(path)
    if plain.endswith(".parquet"):
        if not name.endswith(".gz") and is_bdf_header(_parquet_columns(path)):
            return read_bdf(path)
        return read_labtwin_parquet(path)
    if plain.endswith(".csv"):
        if is_bdf_header(_csv_header(path)):
            return read_bdf(path)
        if name.endswith(".gz"):
            raise RecordingError(f"{path}: a gzip file is read when it holds BDF; this one's header is not BDF's")
        return read_labtwin_csv(path)
    raise RecordingError(f"{path}: unknown recording format {path.suffix!r}: labtwin reads {READS}")
