-- claim_token: which request holds an idempotency key's claim. Renewing, releasing and
-- completing the claim need it, so that a request whose claim was taken over (it looked
-- abandoned) can no longer touch the claim of the request that took it.
ALTER TABLE idempotency_keys ADD COLUMN claim_token BLOB;
