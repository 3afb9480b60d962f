-- Keys, jobs, their history, and idempotency records. Ids are UUIDv7, so their order is their
-- time order.

CREATE TABLE api_keys (
    id          UUID PRIMARY KEY,
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    revoked_at  TIMESTAMPTZ
);

CREATE TABLE jobs (
    id                  UUID PRIMARY KEY,
    tenant              UUID NOT NULL REFERENCES api_keys (id),
    kind                TEXT NOT NULL CHECK (kind IN ('training', 'generation', 'raw')),
    avatar_id           UUID,
    endpoint            TEXT NOT NULL,
    input               JSONB NOT NULL,
    status              TEXT NOT NULL CHECK (status IN
                            ('pending', 'submitted', 'running', 'succeeded', 'failed', 'canceled')),
    fal_request_id      TEXT,
    status_url          TEXT,
    response_url        TEXT,
    cancel_url          TEXT,
    queue_position      BIGINT,
    result              JSONB,
    error_code          TEXT,
    error_message       TEXT,
    error_detail        JSONB,
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     TIMESTAMPTZ,
    lease_until         TIMESTAMPTZ,
    cancel_requested_at TIMESTAMPTZ,
    sandbox             BOOLEAN NOT NULL DEFAULT FALSE,
    idempotency_key     TEXT,
    created_at          TIMESTAMPTZ NOT NULL,
    updated_at          TIMESTAMPTZ NOT NULL,
    submitted_at        TIMESTAMPTZ,
    started_at          TIMESTAMPTZ,
    finished_at         TIMESTAMPTZ
);

CREATE INDEX jobs_by_tenant ON jobs (tenant, id DESC);
CREATE INDEX jobs_by_tenant_status ON jobs (tenant, status, id DESC);
CREATE INDEX jobs_by_avatar ON jobs (avatar_id, id DESC) WHERE avatar_id IS NOT NULL;
CREATE INDEX jobs_due ON jobs (status, next_attempt_at);
CREATE UNIQUE INDEX jobs_by_fal_request ON jobs (fal_request_id) WHERE fal_request_id IS NOT NULL;

CREATE TABLE job_events (
    id          BIGSERIAL PRIMARY KEY,
    job_id      UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at          TIMESTAMPTZ NOT NULL,
    from_status TEXT,
    to_status   TEXT NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('api', 'dispatcher', 'callback', 'reconciler')),
    detail      JSONB
);

CREATE INDEX job_events_by_job ON job_events (job_id, id);

CREATE TABLE idempotency_keys (
    tenant          UUID NOT NULL REFERENCES api_keys (id),
    key             TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    response_status INTEGER,
    response_body   TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    locked_at       TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant, key)
);

CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
