-- FAL's files expire. lora_checked_at: when FAL was last seen serving a LoRA file (in a
-- training's result, at its copy, or at a check); one it no longer serves is uploaded again
-- from falgate's copy, and lora_url then names the new upload. lora_next_try_at: when the
-- next copy or check of the file is due (NULL without a LoRA); a failed one is put off, so
-- that a few dead files never hold up the others.

ALTER TABLE avatars ADD COLUMN lora_checked_at TIMESTAMPTZ;
ALTER TABLE avatars ADD COLUMN lora_next_try_at TIMESTAMPTZ;

-- LoRA files trained before this migration are copied and checked from now on.
UPDATE avatars SET lora_next_try_at = updated_at WHERE lora_url IS NOT NULL;

CREATE INDEX avatars_lora_due ON avatars (lora_next_try_at) WHERE lora_next_try_at IS NOT NULL;
