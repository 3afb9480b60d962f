-- What following jobs at FAL needs: when a client's cancel was passed on to FAL, and every
-- callback that carried our valid URL token, stored raw.

ALTER TABLE jobs ADD COLUMN cancel_forwarded_at TIMESTAMPTZ;

CREATE INDEX jobs_cancel_pending ON jobs (cancel_requested_at)
    WHERE cancel_requested_at IS NOT NULL AND cancel_forwarded_at IS NULL;

CREATE TABLE fal_callbacks (
    id          UUID PRIMARY KEY,
    job_id      UUID NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    received_at TIMESTAMPTZ NOT NULL,
    request_id  TEXT,
    headers     JSONB NOT NULL,
    body        BYTEA NOT NULL,
    signature   TEXT NOT NULL CHECK (signature IN ('valid', 'stale', 'invalid')),
    outcome     TEXT NOT NULL CHECK (outcome IN
                    ('applied', 'duplicate', 'stale', 'foreign_request', 'deferred', 'rejected')),
    detail      JSONB
);

CREATE INDEX fal_callbacks_by_job ON fal_callbacks (job_id, id);
