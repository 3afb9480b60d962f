-- Events for clients: one row per change a client is told of, written in the transaction of
-- the change. `sequence` counts each tenant's events from 1 with no gap; it is taken from
-- event_sequences in the writing transaction (SQLite has one writer at a time), so a tenant's
-- events commit in sequence order and a reader that has seen sequence n never later finds one
-- below it. `snapshot` is the resource as stored when the event happened (a job, an avatar, or
-- a batch with its jobs), from which the API renders `data` as GET shows it.
CREATE TABLE events (
    id          BLOB PRIMARY KEY NOT NULL,
    tenant      BLOB NOT NULL REFERENCES api_keys (id),
    sequence    INTEGER NOT NULL,
    type        TEXT NOT NULL,
    resource_id BLOB NOT NULL,
    batch_id    BLOB,
    created_at  TEXT NOT NULL,
    snapshot    TEXT NOT NULL,
    UNIQUE (tenant, sequence)
);

CREATE INDEX events_by_resource ON events (resource_id, sequence);
CREATE INDEX events_by_batch ON events (batch_id, sequence) WHERE batch_id IS NOT NULL;

CREATE TABLE event_sequences (
    tenant        BLOB PRIMARY KEY NOT NULL REFERENCES api_keys (id),
    last_sequence INTEGER NOT NULL
);
