-- Events for clients: one row per change a client is told of, written in the transaction of
-- the change. `sequence` counts each tenant's events from 1 with no gap. Here it is given after
-- commit, by one numbering transaction at a time (under an advisory lock), to committed rows
-- only, in the order they were written (`position`): so writers of events never wait for each
-- other, and a reader that has seen number n never later finds one below it. A row not yet
-- numbered is not shown. `snapshot` is the resource as stored when the event happened (a job,
-- an avatar, or a batch with its jobs), from which the API renders `data` as GET shows it.
CREATE TABLE events (
    id          UUID PRIMARY KEY,
    tenant      UUID NOT NULL REFERENCES api_keys (id),
    sequence    BIGINT,
    position    BIGINT GENERATED ALWAYS AS IDENTITY,
    type        TEXT NOT NULL,
    resource_id UUID NOT NULL,
    batch_id    UUID,
    created_at  TIMESTAMPTZ NOT NULL,
    snapshot    JSONB NOT NULL,
    UNIQUE (tenant, sequence)
);

CREATE INDEX events_by_resource ON events (resource_id, sequence);
CREATE INDEX events_by_batch ON events (batch_id, sequence) WHERE batch_id IS NOT NULL;
CREATE INDEX events_to_number ON events (position) WHERE sequence IS NULL;

CREATE TABLE event_sequences (
    tenant        UUID PRIMARY KEY REFERENCES api_keys (id),
    last_sequence BIGINT NOT NULL
);
