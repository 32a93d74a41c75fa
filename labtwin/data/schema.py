"""The store's tables as they are at the newest schema version, for SQLite and PostgreSQL alike.

The migrations under ``migrations/versions`` are the schema's history and this
module is its present; ``tests/test_store_migrations.py`` checks that a database
migrated from the oldest version matches these tables exactly.

Column names are lower case (PostgreSQL folds unquoted names);
``SAMPLE_FIELDS`` maps them to labtwin's unit-bearing names. Times of day are
ISO 8601 text, as the first labtwin stored them; durations are ``time_s``
seconds. Types are the ones both databases spell the same way (TEXT, INTEGER,
DOUBLE PRECISION), so one file of DDL describes both.
"""

from __future__ import annotations

from sqlalchemy import (
    DOUBLE_PRECISION,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
)

metadata = MetaData()

# (model field, SQL column, SQL type)
SAMPLE_FIELDS: tuple[tuple[str, str, type[Integer] | type[DOUBLE_PRECISION]], ...] = (
    ("time_s", "time_s", DOUBLE_PRECISION),
    ("voltage_V", "voltage_v", DOUBLE_PRECISION),
    ("current_A", "current_a", DOUBLE_PRECISION),
    ("capacity_Ah", "capacity_ah", DOUBLE_PRECISION),
    ("temperature_C", "temperature_c", DOUBLE_PRECISION),
    ("step", "step", Integer),
    ("cycle", "cycle", Integer),
)

runs = Table(
    "runs",
    metadata,
    Column("run_id", Text, primary_key=True),
    Column("lab", Text),
    Column("channel", Text),
    Column("cell_id", Text),
    Column("protocol", Text),
    Column("n_steps", Integer),
    Column("started_at", Text),
    Column("stopped_at", Text),
    Column("exit_status", Text),
    Column("reason", Text),
    Column("reported_samples", Integer),
    Column("reported_last_seq", Integer),
    Column("cell_time_s", DOUBLE_PRECISION),
    Column("flow_run_id", Text),
    Column("start_doc", Text),
    Column("stop_doc", Text),
)

# One row per SampleBatch received: the idempotency key of the samples (QoS 1 delivers at least once). Since
# schema 3 it holds the sha256 of the samples as stored (``labtwin.data.digest``), so a batch that reuses a stored
# (run_id, seq) with other samples is told from a re-delivery; NULL for batches stored before schema 3.
batches = Table(
    "batches",
    metadata,
    Column("run_id", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("n", Integer, nullable=False),
    Column("digest", Text),
    PrimaryKeyConstraint("run_id", "seq"),
)

# Since schema 3: a batch that arrived with a stored (run_id, seq) but other samples (a forgery, or a publisher
# that re-numbered after a crash). The stored batch stays; the incoming one is kept here whole, so neither is
# lost and someone can decide which is true. Keyed on its digest: a re-delivered conflict is recorded once.
batch_conflicts = Table(
    "batch_conflicts",
    metadata,
    Column("run_id", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("incoming_digest", Text, nullable=False),
    Column("stored_digest", Text, nullable=False),
    Column("n", Integer, nullable=False),
    Column("received_at", Text, nullable=False),
    Column("doc", Text, nullable=False),
    PrimaryKeyConstraint("run_id", "seq", "incoming_digest"),
)

# Unique on (run_id, seq, i) since schema 2: a sample is stored once even if a batch row were lost. A unique
# index rather than a primary key, so the migration adds it to a large SQLite file without copying the table.
samples = Table(
    "samples",
    metadata,
    Column("run_id", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("i", Integer, nullable=False),
    *(Column(col, typ) for _, col, typ in SAMPLE_FIELDS),
    Index("samples_run_seq_i", "run_id", "seq", "i", unique=True),
)

impedance = Table(
    "impedance",
    metadata,
    Column("run_id", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("i", Integer, nullable=False),
    Column("frequency_hz", DOUBLE_PRECISION),
    Column("z_real_ohm", DOUBLE_PRECISION),
    Column("z_imag_ohm", DOUBLE_PRECISION),
    PrimaryKeyConstraint("run_id", "seq", "i"),
)

step_events = Table(
    "step_events",
    metadata,
    Column("run_id", Text, nullable=False),
    Column("step_index", Integer, nullable=False),
    Column("event", Text, nullable=False),
    Column("channel", Text),
    Column("label", Text),
    Column("cycle", Integer),
    Column("step", Text),
    Column("time_s", DOUBLE_PRECISION),
    Column("reason_kind", Text),
    Column("reason_name", Text),
    Column("doc", Text, nullable=False),
    PrimaryKeyConstraint("run_id", "step_index", "event"),
)

# The twin's findings: one row per anomaly (keyed so a re-delivered message is stored once); indexed by cell
# since schema 2, because a cell's history is read across runs.
anomalies = Table(
    "anomalies",
    metadata,
    Column("run_id", Text, nullable=False),
    Column("cell", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("time_s", DOUBLE_PRECISION, nullable=False),
    Column("detected_time_s", DOUBLE_PRECISION),
    Column("step", Integer),
    Column("cycle", Integer),
    Column("action", Text),
    Column("message", Text),
    Column("doc", Text, nullable=False),
    PrimaryKeyConstraint("run_id", "cell", "kind", "time_s"),
    Index("anomalies_cell_time", "cell", "time_s"),
)

# The cell states the twin published, for trends of SOC, resistances and capacity after the fact.
cell_states = Table(
    "cell_states",
    metadata,
    Column("cell", Text, nullable=False),
    Column("run_id", Text, nullable=False),
    Column("time_s", DOUBLE_PRECISION, nullable=False),
    Column("doc", Text, nullable=False),
    PrimaryKeyConstraint("cell", "run_id", "time_s"),
)

# Since schema 4: the stretches of a run in which no agent read the instrument (labtwin.documents.Outage), so a
# resumed run's record says where it has a hole instead of reading as seamless. Keyed on the run and the time the
# outage began: a re-delivered Outage is stored once. ``charge_ah`` NULL: the instrument could not say.
outages = Table(
    "outages",
    metadata,
    Column("run_id", Text, nullable=False),
    Column("from_time_s", DOUBLE_PRECISION, nullable=False),
    Column("channel", Text),
    Column("cause", Text),
    Column("step_index", Integer),
    Column("to_time_s", DOUBLE_PRECISION),
    Column("span_s", DOUBLE_PRECISION),
    Column("wall_span_s", DOUBLE_PRECISION),
    Column("charge_ah", DOUBLE_PRECISION),
    Column("doc", Text, nullable=False),
    PrimaryKeyConstraint("run_id", "from_time_s"),
)

# Since schema 5: what an operator did by hand from the dashboard (pause, resume, stop), who, when, and what the
# agent answered, so a run's timeline shows it and a lab can say who touched a cell.
operator_actions = Table(
    "operator_actions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Text),
    Column("lab", Text, nullable=False),
    Column("channel", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("user_name", Text, nullable=False),
    Column("role", Text, nullable=False),
    Column("wall_time", Text, nullable=False),
    Column("time_s", DOUBLE_PRECISION),
    Column("outcome", Text, nullable=False),
    Column("detail", Text, nullable=False, server_default=""),
    Index("operator_actions_run", "run_id"),
)

# A copy of the sample rows one write inserted, as compressed float64 columns (labtwin.data.blocks): what
# ``Store.samples`` reads when a run's blocks add up to its batches; the rows stay the record.
sample_blocks = Table(
    "sample_blocks",
    metadata,
    Column("run_id", Text, nullable=False),
    Column("first_seq", Integer, nullable=False),
    Column("last_seq", Integer, nullable=False),
    Column("n", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    PrimaryKeyConstraint("run_id", "first_seq"),
)
