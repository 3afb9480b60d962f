-- An avatar records the trainer that made its weights and their base family, which decides
-- where they generate: a retraining that fails leaves the weights of the training before it,
-- so the avatar's last training job does not say.
ALTER TABLE avatars ADD COLUMN trainer TEXT;
ALTER TABLE avatars ADD COLUMN base_family TEXT;

-- Wan 2.2's second LoRA file (for its high-noise transformer), kept like the first: a copy in
-- falgate's storage, taken from high_noise_copy_url. Its checks share lora_checked_at and
-- lora_next_try_at with the first file.
ALTER TABLE avatars ADD COLUMN high_noise_lora_url TEXT;
ALTER TABLE avatars ADD COLUMN high_noise_copy_key TEXT;
ALTER TABLE avatars ADD COLUMN high_noise_copy_sha256 TEXT;
ALTER TABLE avatars ADD COLUMN high_noise_copy_bytes INTEGER;
ALTER TABLE avatars ADD COLUMN high_noise_copy_url TEXT;

-- Weights trained before this migration: the trainer of the avatar's succeeded training whose
-- result holds them (its endpoint first, turned into the trainer's id below). A training that
-- succeeded without weights left the older ones; a file uploaded again from falgate's copy is
-- in no result, and then the last training that succeeded is taken.
UPDATE avatars SET trainer = (
    SELECT jobs.endpoint FROM jobs
    WHERE jobs.avatar_id = avatars.id AND jobs.kind = 'training' AND jobs.status = 'succeeded'
        AND instr(jobs.result, COALESCE(avatars.lora_url, avatars.finetune_id)) > 0
    ORDER BY jobs.id DESC
    LIMIT 1
)
WHERE lora_url IS NOT NULL OR finetune_id IS NOT NULL;

UPDATE avatars SET trainer = (
    SELECT jobs.endpoint FROM jobs
    WHERE jobs.avatar_id = avatars.id AND jobs.kind = 'training' AND jobs.status = 'succeeded'
    ORDER BY jobs.id DESC
    LIMIT 1
)
WHERE trainer IS NULL AND (lora_url IS NOT NULL OR finetune_id IS NOT NULL);

-- Every trainer falgate knew then.
UPDATE avatars SET trainer = CASE trainer
        WHEN 'fal-ai/flux-lora-portrait-trainer' THEN 'portrait'
        WHEN 'fal-ai/flux-lora-fast-training' THEN 'fast_lora'
        WHEN 'fal-ai/turbo-flux-trainer' THEN 'turbo_flux'
        WHEN 'fal-ai/flux-2-trainer' THEN 'flux_2'
        WHEN 'fal-ai/qwen-image-2512-trainer' THEN 'qwen_image_2512'
        WHEN 'fal-ai/z-image-trainer' THEN 'z_image'
        WHEN 'fal-ai/krea-2-trainer' THEN 'krea_2'
        WHEN 'fal-ai/wan-22-image-trainer' THEN 'wan_22_image'
        WHEN 'fal-ai/flux-pro-trainer' THEN 'pro'
    END
WHERE trainer IS NOT NULL;

-- Wan 2.2's second file, from the result that holds its first; due for its copy at once.
UPDATE avatars SET high_noise_lora_url = (
    SELECT json_extract(jobs.result, '$.high_noise_lora.url')
    FROM jobs
    WHERE jobs.avatar_id = avatars.id AND jobs.kind = 'training' AND jobs.status = 'succeeded'
        AND instr(jobs.result, COALESCE(avatars.lora_url, avatars.finetune_id)) > 0
    ORDER BY jobs.id DESC
    LIMIT 1
), lora_next_try_at = created_at
WHERE trainer = 'wan_22_image' AND lora_url IS NOT NULL;

UPDATE avatars SET base_family = CASE
        WHEN finetune_id IS NOT NULL AND lora_url IS NULL THEN 'flux-1-pro-finetune'
        WHEN trainer = 'flux_2' THEN 'flux-2'
        WHEN trainer = 'qwen_image_2512' THEN 'qwen-image-2512'
        WHEN trainer = 'z_image' THEN 'z-image-turbo'
        WHEN trainer = 'krea_2' THEN 'krea-2'
        WHEN trainer = 'wan_22_image' THEN 'wan-2.2'
        -- Until the registry, every LoRA falgate trained was FLUX.1 [dev].
        ELSE 'flux-1-dev'
    END
WHERE lora_url IS NOT NULL OR finetune_id IS NOT NULL;

-- A client's caption of a training photo, given at upload: trainers that read captions get it
-- after the trigger phrase, in a text file beside the photo.
ALTER TABLE photos ADD COLUMN caption TEXT;
