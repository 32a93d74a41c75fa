"""Which reader a file gets: by its name, and for a shared suffix (.csv, .parquet) by its header."""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

from labtwin.formats.arbin import is_arbin_header, read_arbin_csv, read_arbin_res, read_arbin_xlsx
from labtwin.formats.bdf import is_bdf_header, read_bdf
from labtwin.formats.biologic import read_mpr
from labtwin.formats.cycler_columns import xlsx_headers
from labtwin.formats.labtwin_files import read_labtwin_csv, read_labtwin_parquet
from labtwin.formats.landt import is_landt_header, read_landt_xlsx
from labtwin.formats.maccor import is_maccor_text, read_maccor_text
from labtwin.formats.neware import read_neware
from labtwin.formats.recording import Recording, RecordingError

READS = ".mpr (EC-Lab), .nda and .ndax (Neware), Arbin (.res, .csv, .xlsx), Maccor text (.txt, .001...), LANDT .xlsx, BDF (.bdf, .bdf.csv, .bdf.parquet, .csv, gzip), labtwin's samples.csv or .parquet export"


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


def _text_head(path: Path, n: int = 30) -> list[str]:
    """The first lines of a text file, for telling a Maccor export (test information, then a tab-separated
    header) from a comma-separated table."""
    try:
        with path.open("r", encoding="utf-8", errors="replace", newline="") as fh:
            return [line.rstrip("\r\n") for _, line in zip(range(n), fh)]
    except OSError as exc:
        raise RecordingError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _unrecognised(path: Path, header: object) -> RecordingError:
    shown = repr(header)
    shown = shown if len(shown) <= 160 else shown[:157] + "..."
    return RecordingError(
        f"{path}: unknown recording format: its header {shown} is none of Arbin's, Maccor's, LANDT's, BDF's or "
        f"labtwin's; labtwin reads {READS}"
    )


def _read_text_table(path: Path) -> Recording:
    """A .csv, .txt or Maccor-numbered file, by its header: Maccor, Arbin, BDF or labtwin's own."""
    lines = _text_head(path)
    if is_maccor_text(lines):
        return read_maccor_text(path)
    header = _csv_header(path)
    if is_bdf_header(header):
        return read_bdf(path)
    if is_arbin_header(header):
        return read_arbin_csv(path)
    if {"time_s", "voltage_V", "current_A"} & {h.strip() for h in header}:
        return read_labtwin_csv(path)  # labtwin's own, which names any column it lacks
    raise _unrecognised(path, header if len(header) > 1 else (lines[0] if lines else ""))


def _read_xlsx(path: Path) -> Recording:
    headers = xlsx_headers(path)
    if any(is_arbin_header(h) for h in headers.values()):
        return read_arbin_xlsx(path)
    if any(is_landt_header(h) for h in headers.values()):
        return read_landt_xlsx(path)
    raise _unrecognised(path, headers)


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
        return _read_text_table(path)
    if name.endswith(".txt") or re.search(r"\.\d{3}$", name):  # Maccor numbers its files .001, .002...
        return _read_text_table(path)
    if name.endswith(".xlsx"):
        return _read_xlsx(path)
    if name.endswith(".res"):
        return read_arbin_res(path)
    raise RecordingError(f"{path}: unknown recording format {path.suffix!r}: labtwin reads {READS}")
