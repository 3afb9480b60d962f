-- Webhook endpoints: where a tenant's events are delivered, signed per Standard Webhooks with
-- the endpoint's secret (and, for a while after a rotation, the previous one too). An endpoint
-- with a `resource_id` was given with the request that made that job or batch, and receives
-- its events alone, until the resource has ended (`finished`).
-- `next_sequence` is the first of the tenant's event numbers not yet planned for delivery here:
-- an endpoint receives the events that happen after it is made.
CREATE TABLE webhook_endpoints (
    id                    UUID PRIMARY KEY,
    tenant                UUID NOT NULL REFERENCES api_keys (id),
    url                   TEXT NOT NULL,
    event_types           TEXT,
    description           TEXT NOT NULL,
    enabled               BOOLEAN NOT NULL,
    disabled_reason       TEXT,
    secret                TEXT NOT NULL,
    previous_secret       TEXT,
    previous_secret_until TIMESTAMPTZ,
    next_sequence         BIGINT NOT NULL,
    resource_id           UUID,
    -- Set once the resource of an endpoint given with a request has ended: nothing more is
    -- planned for it (what was planned is still delivered).
    finished              BOOLEAN NOT NULL DEFAULT FALSE,
    created_at            TIMESTAMPTZ NOT NULL,
    updated_at            TIMESTAMPTZ NOT NULL
);

-- The endpoints a client manages (not those given with a request), by tenant.
CREATE INDEX webhook_endpoints_by_tenant ON webhook_endpoints (tenant, id)
    WHERE resource_id IS NULL;
-- What planning looks through: endpoints that may still take events.
CREATE INDEX webhook_endpoints_to_plan ON webhook_endpoints (next_sequence)
    WHERE enabled AND NOT finished;

-- One event to send to one endpoint, until a 2xx or the last attempt.
CREATE TABLE webhook_deliveries (
    id              UUID PRIMARY KEY,
    tenant          UUID NOT NULL,
    endpoint_id     UUID NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_id        UUID NOT NULL REFERENCES events (id),
    status          TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts        INTEGER NOT NULL,
    next_attempt_at TIMESTAMPTZ,
    lease_until     TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_by_endpoint ON webhook_deliveries (endpoint_id, id);

-- Every attempt to send a delivery, with what came back.
CREATE TABLE webhook_attempts (
    id             UUID PRIMARY KEY,
    delivery_id    UUID NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    endpoint_id    UUID NOT NULL,
    event_id       UUID NOT NULL,
    at             TIMESTAMPTZ NOT NULL,
    duration_ms    BIGINT NOT NULL,
    status_code    INTEGER,
    error          TEXT,
    response_start TEXT
);

CREATE INDEX webhook_attempts_by_endpoint ON webhook_attempts (endpoint_id, id);
CREATE INDEX webhook_attempts_by_delivery ON webhook_attempts (delivery_id);

-- The secret that signs the webhooks given with a request, one per tenant, made on first use.
CREATE TABLE webhook_default_secrets (
    tenant     UUID PRIMARY KEY REFERENCES api_keys (id),
    secret     TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
