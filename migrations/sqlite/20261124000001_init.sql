-- Keys, jobs, their history, and idempotency records. Times are UTC (RFC 3339 text),
-- ids are UUIDv7 (16-byte blobs, so that their byte order is their time order).

CREATE TABLE api_keys (
    id          BLOB PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

CREATE TABLE jobs (
    id                  BLOB PRIMARY KEY NOT NULL,
    tenant              BLOB NOT NULL REFERENCES api_keys (id),
    kind                TEXT NOT NULL CHECK (kind IN ('training', 'generation', 'raw')),
    avatar_id           BLOB,
    endpoint            TEXT NOT NULL,
    input               TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN
                            ('pending', 'submitted', 'running', 'succeeded', 'failed', 'canceled')),
    fal_request_id      TEXT,
    status_url          TEXT,
    response_url        TEXT,
    cancel_url          TEXT,
    queue_position      INTEGER,
    result              TEXT,
    error_code          TEXT,
    error_message       TEXT,
    error_detail        TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     TEXT,
    lease_until         TEXT,
    cancel_requested_at TEXT,
    sandbox             BOOLEAN NOT NULL DEFAULT FALSE,
    idempotency_key     TEXT,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL,
    submitted_at        TEXT,
    started_at          TEXT,
    finished_at         TEXT
);

CREATE INDEX jobs_by_tenant ON jobs (tenant, id DESC);
CREATE INDEX jobs_by_tenant_status ON jobs (tenant, status, id DESC);
CREATE INDEX jobs_by_avatar ON jobs (avatar_id, id DESC) WHERE avatar_id IS NOT NULL;
CREATE INDEX jobs_due ON jobs (status, next_attempt_at);
CREATE UNIQUE INDEX jobs_by_fal_request ON jobs (fal_request_id) WHERE fal_request_id IS NOT NULL;

CREATE TABLE job_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      BLOB NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at          TEXT NOT NULL,
    from_status TEXT,
    to_status   TEXT NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('api', 'dispatcher', 'callback', 'reconciler')),
    detail      TEXT
);

CREATE INDEX job_events_by_job ON job_events (job_id, id);

CREATE TABLE idempotency_keys (
    tenant          BLOB NOT NULL REFERENCES api_keys (id),
    key             TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    response_status INTEGER,
    response_body   TEXT,
    created_at      TEXT NOT NULL,
    locked_at       TEXT NOT NULL,
    PRIMARY KEY (tenant, key)
);

CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
