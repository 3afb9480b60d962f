-- Events are kept for a while (FALGATE_EVENT_RETENTION_DAYS), then removed with their finished
-- deliveries. Finding an event's deliveries (to keep an event that one still waits to send, and
-- for the foreign key's check when an event goes) must not read every delivery.
CREATE INDEX webhook_deliveries_by_event ON webhook_deliveries (event_id);

-- An event is being sent to an endpoint once at most: a redelivery asked while one is under way
-- adds nothing.
CREATE UNIQUE INDEX webhook_deliveries_one_pending ON webhook_deliveries (event_id, endpoint_id)
    WHERE status = 'pending';
