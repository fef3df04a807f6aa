-- Node database schema of the second release (main at 834b748, with quarantine).
-- Each stage created its tables with this DDL; user_version stayed 0.
-- dicomnode/spool.py
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    transfer_syntax TEXT,
    received_at REAL NOT NULL,
    assoc_id TEXT
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid, series_uid);
CREATE INDEX IF NOT EXISTS instances_assoc ON instances(assoc_id);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    meta_json TEXT NOT NULL,
    n_instances INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    expected_count INTEGER,
    expected_source TEXT
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE INDEX IF NOT EXISTS series_last ON series(last_received);
CREATE TABLE IF NOT EXISTS associations (
    assoc_id TEXT PRIMARY KEY,
    calling_ae TEXT,
    peer_host TEXT,
    opened_at REAL NOT NULL,
    released_at REAL,
    n_stored INTEGER NOT NULL DEFAULT 0,
    aborted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS journal_backlog (
    journal TEXT PRIMARY KEY,
    pending INTEGER NOT NULL,
    updated_at REAL NOT NULL
);
-- dicomnode/assembler.py
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    routes TEXT,
    no_route_series TEXT,
    last_instance_at REAL,
    completed_at REAL,
    processed_at REAL,
    purged_at REAL
);
CREATE TABLE IF NOT EXISTS result_series (
    study_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    kind TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    series_number INTEGER,
    PRIMARY KEY (study_uid, route, kind)
);
CREATE TABLE IF NOT EXISTS result_documents (
    study_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    PRIMARY KEY (study_uid, route)
);
-- dicomnode/jobs.py
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    task TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    series_uids TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    timings TEXT,
    model_version TEXT,
    UNIQUE (study_uid, route, generation)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, next_attempt_at);
-- dicomnode/outbox.py
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER,
    study_uid TEXT,
    sop_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL,
    UNIQUE (path, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, destination, next_attempt_at);
-- dicomnode/quarantine.py
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    sop_instance_uid TEXT,
    assoc_id TEXT,
    acknowledged INTEGER NOT NULL,
    quarantined_at REAL NOT NULL
);
