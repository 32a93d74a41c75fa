"""`labtwin import FILE...`: a cycler's file stored as a run, so runs, export, analyze, replay and the dashboard
work on a lab's historical data exactly as on a live one.

The file becomes the documents an agent would have published for it (labtwin.data.replay.documents: steps,
cycles and charge by labtwin's one definition) and they are written straight into the store, as the recorder
writes a live run's. The run id is made from the file's content (SHA-256), so importing the same file twice
stores it once, whatever its name or path, and a changed file is a new run.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

IMPORT_CHANNEL = "import"
WRITE_CHUNK = 200  # documents per store transaction


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def import_file(
    store: Any, path: Path, *, lab: str, cell: str | None, nominal_capacity_Ah: float | None
) -> dict[str, Any]:
    """Store one file as a run; what was done, for the CLI to print."""
    from labtwin.data.replay import documents
    from labtwin.documents import RunStart, SampleBatch
    from labtwin.formats import read_recording

    digest = file_digest(path)
    run_id = f"import-{digest[:16]}"
    existing, _ = store.run_documents(run_id)
    if existing is not None:
        return {"file": str(path), "run_id": run_id, "imported": False, "reason": "already imported (same content)"}
    rec = read_recording(path)
    cell_id = cell or rec.name
    docs = list(
        documents(
            rec,
            lab=lab,
            channel=IMPORT_CHANNEL,
            cell_id=cell_id,
            run_id=run_id,
            nominal_capacity_Ah=nominal_capacity_Ah,
        )
    )
    start = docs[0]
    assert isinstance(start, RunStart)
    metadata = dict(start.metadata)
    metadata.update({"source_file": path.name, "source_sha256": digest})
    update: dict[str, Any] = {"metadata": metadata, "protocol": f"import of {path.name}"}
    if rec.unix_start_s is not None:
        update["time"] = datetime.fromtimestamp(rec.unix_start_s, UTC)
    docs[0] = start.model_copy(update=update)
    for k in range(0, len(docs), WRITE_CHUNK):
        store.write(docs[k : k + WRITE_CHUNK])
    n_samples = sum(len(d.time_s) for d in docs if isinstance(d, SampleBatch))
    return {
        "file": str(path),
        "run_id": run_id,
        "imported": True,
        "format": rec.source_format,
        "cell_id": cell_id,
        "samples": n_samples,
        "steps": start.n_steps,
        "cycles": int(rec.cycle.max()) if len(rec.cycle) else 0,
        "nominal_capacity_Ah": float(metadata["nominal_capacity_Ah"]) if "nominal_capacity_Ah" in metadata else None,
        "nominal_capacity_source": metadata.get("nominal_capacity_source"),
        "notes": rec.notes,
    }
