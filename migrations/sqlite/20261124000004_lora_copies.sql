-- A copy of each trained LoRA kept in falgate's own storage: FAL's file URLs expire.

ALTER TABLE avatars ADD COLUMN lora_copy_key TEXT;
ALTER TABLE avatars ADD COLUMN lora_copy_sha256 TEXT;
ALTER TABLE avatars ADD COLUMN lora_copy_bytes INTEGER;
-- The LoRA URL the copy was taken from: a newer training makes the copy stale.
ALTER TABLE avatars ADD COLUMN lora_copy_url TEXT;
