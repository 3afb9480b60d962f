-- Avatars, their training photos, and generation batches.

CREATE TABLE avatars (
    id              UUID PRIMARY KEY,
    tenant          UUID NOT NULL REFERENCES api_keys (id),
    name            TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('character', 'style', 'product', 'general')),
    trigger_phrase  TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('draft', 'training', 'ready', 'failed')),
    training_job_id UUID,
    lora_url        TEXT,
    lora_config_url TEXT,
    finetune_id     TEXT,
    error_code      TEXT,
    error_message   TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);

CREATE INDEX avatars_by_tenant ON avatars (tenant, id DESC);

CREATE TABLE photos (
    id           UUID PRIMARY KEY,
    avatar_id    UUID NOT NULL REFERENCES avatars (id) ON DELETE CASCADE,
    sha256       TEXT NOT NULL,
    content_type TEXT NOT NULL,
    width        INTEGER NOT NULL,
    height       INTEGER NOT NULL,
    bytes        BIGINT NOT NULL,
    storage_key  TEXT NOT NULL,
    file_name    TEXT,
    created_at   TIMESTAMPTZ NOT NULL,
    UNIQUE (avatar_id, sha256)
);

CREATE TABLE batches (
    id         UUID PRIMARY KEY,
    tenant     UUID NOT NULL REFERENCES api_keys (id),
    avatar_id  UUID NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);

ALTER TABLE jobs ADD COLUMN batch_id UUID;
CREATE INDEX jobs_by_batch ON jobs (batch_id) WHERE batch_id IS NOT NULL;
