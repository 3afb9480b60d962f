-- When FAL was last seen serving a ready avatar's LoRA file. FAL's files expire; one it no
-- longer serves is uploaded again from falgate's copy, and lora_url then names the new upload.

ALTER TABLE avatars ADD COLUMN lora_checked_at TIMESTAMPTZ;
