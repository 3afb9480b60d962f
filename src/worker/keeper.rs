//! Keeps a copy of every trained LoRA file in falgate's own storage (Wan 2.2's two files
//! both): FAL's file URLs expire, and an avatar whose weights are gone is lost. Avatars whose
//! current weights have no copy are picked up after each training.
//!
//! It also checks, every `FALGATE_LORA_CHECK_SECS` and at once after a generation on the avatar
//! failed, that FAL still serves each kept LoRA file, because generations hand FAL that URL.
//! A file FAL no longer serves is uploaded again from
//! the copy, and the avatar points at the new upload.
//!
//! When the next copy or check of an avatar is due is kept in the database, so replicas share
//! it; a failed one is put off, with backoff, so that a few dead files never hold up the others.

use super::IDLE_WAIT;
use super::WorkerContext;
use crate::fal::FileProbe;
use crate::store::{Avatar, CopyRecorded, LoraCopy, LoraFile};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::watch;
use uuid::Uuid;

/// Largest LoRA file kept (FAL's are tens to a few hundred MB).
const MAX_LORA_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// How long an avatar whose copy or check failed waits first; doubled on each further failure.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// How long one download may take: the shared client's limit is sized for API calls.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(1800);
/// How long one check of a FAL file may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);
/// Copies made, and checks done, per round.
const PER_ROUND: u32 = 4;

pub async fn run(ctx: WorkerContext, mut stopping: watch::Receiver<bool>) {
    let mut failures = Failures::default();
    while !*stopping.borrow() {
        let now = crate::domain::now();
        let to_keep = ctx.store.avatars_missing_lora_copy(now, PER_ROUND).await;
        for avatar in found_or_none(to_keep, "could not look for LoRA files to keep") {
            let Some(url) = avatar.lora_url.clone() else {
                continue;
            };
            let outcome = keep_uncopied(&ctx, &avatar).await;
            let what = "could not keep a copy of a LoRA file";
            failures.settle(&ctx, avatar.id, &url, outcome, what).await;
        }
        let to_check = ctx.store.avatars_due_lora_check(now, PER_ROUND).await;
        for avatar in found_or_none(to_check, "could not look for LoRA files to check") {
            let Some(mut url) = avatar.lora_url.clone() else {
                continue;
            };
            let outcome = check_all(&ctx, &avatar, &mut url).await;
            let what = "could not check FAL's LoRA file";
            failures.settle(&ctx, avatar.id, &url, outcome, what).await;
        }
        tokio::select! {
            () = ctx.wake.keeper.notified() => {}
            () = tokio::time::sleep(IDLE_WAIT) => {}
            _ = stopping.changed() => {}
        }
    }
}

/// What a query found, or nothing when it failed: the round goes on, and the next one asks again.
fn found_or_none<T>(found: Result<Vec<T>, impl std::fmt::Display>, what: &str) -> Vec<T> {
    found.unwrap_or_else(|err| {
        tracing::warn!(error = %err, "{what}");
        Vec::new()
    })
}

/// When FAL's file is next checked, after it was seen served now.
fn next_check(ctx: &WorkerContext) -> DateTime<Utc> {
    crate::domain::now()
        + chrono::Duration::from_std(ctx.settings.lora_check_interval)
            .unwrap_or(chrono::Duration::MAX)
}

/// How many times in a row each avatar's file work failed in this process, for the backoff.
#[derive(Default)]
struct Failures(HashMap<Uuid, u32>);

impl Failures {
    /// Forgets a success; puts a failure off in the database, longer each time.
    async fn settle(
        &mut self,
        ctx: &WorkerContext,
        avatar_id: Uuid,
        url: &str,
        outcome: Result<(), String>,
        what: &str,
    ) {
        let Err(err) = outcome else {
            self.0.remove(&avatar_id);
            return;
        };
        let count = self.0.entry(avatar_id).or_insert(0);
        let wait = RETRY_AFTER_FAILURE * 2u32.pow((*count).min(6));
        *count += 1;
        tracing::warn!(avatar = %avatar_id, error = %err, retry_in_secs = wait.as_secs(), "{what}");
        let until = crate::domain::now() + chrono::Duration::from_std(wait).unwrap_or_default();
        if let Err(err) = ctx.store.defer_lora_work(avatar_id, url, until).await {
            tracing::warn!(avatar = %avatar_id, error = %err, "could not put off the LoRA file's next try");
        }
    }
}

/// Copies each of the avatar's files that has no copy yet; stops at the first that fails.
async fn keep_uncopied(ctx: &WorkerContext, avatar: &Avatar) -> Result<(), String> {
    for file in LoraFile::ALL {
        if let (Some(url), None) = (file.url(avatar), file.copy(avatar)) {
            keep(ctx, avatar.id, file, url).await?;
        }
    }
    Ok(())
}

#[tracing::instrument(skip_all, fields(avatar = %avatar_id, file = ?file))]
async fn keep(
    ctx: &WorkerContext,
    avatar_id: Uuid,
    file: LoraFile,
    url: &str,
) -> Result<(), String> {
    let mut stream = std::pin::pin!(
        ctx.fal
            .download(url, DOWNLOAD_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?
    );
    // Streamed to a file while hashed: a LoRA can be hundreds of MB, and is never held whole.
    let mut writer = ctx.blobs.writer().await.map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        if writer.written() + chunk.len() as u64 > MAX_LORA_BYTES {
            return Err("the LoRA file is larger than 2 GiB".into());
        }
        hasher.update(&chunk);
        writer.write(&chunk).await.map_err(|e| e.to_string())?;
    }
    let sha256 = hex::encode(hasher.finalize());
    let copy = LoraCopy {
        key: format!("loras/{avatar_id}/{sha256}.safetensors"),
        sha256,
        bytes: writer.written() as i64,
    };
    writer.finish(&copy.key).await.map_err(|e| e.to_string())?;
    let recorded = ctx
        .store
        .record_lora_copy(
            avatar_id,
            file,
            url,
            &copy,
            crate::domain::now(),
            next_check(ctx),
        )
        .await
        .map_err(|e| e.to_string())?;
    match recorded {
        CopyRecorded::Kept { replaced } => {
            tracing::info!(bytes = copy.bytes, "kept a copy of the LoRA file");
            for old in replaced {
                let _ = ctx.blobs.delete(&old).await;
            }
        }
        // A newer training replaced the weights, the avatar was deleted, or another replica
        // stored the same bytes under the same key meanwhile: the file goes unless it is the
        // avatar's copy now.
        CopyRecorded::Stale { current } => {
            if current.as_deref() != Some(copy.key.as_str()) {
                let _ = ctx.blobs.delete(&copy.key).await;
            }
        }
    }
    Ok(())
}

/// Checks each of the avatar's kept files, then notes that FAL serves them all. `main_url`
/// follows the main file when it is uploaded again, so that what follows finds the avatar.
async fn check_all(
    ctx: &WorkerContext,
    avatar: &Avatar,
    main_url: &mut String,
) -> Result<(), String> {
    for file in LoraFile::ALL {
        let (Some(url), Some(copy)) = (file.url(avatar), file.copy(avatar)) else {
            continue;
        };
        match check(ctx, avatar.id, file, url, &copy.key).await? {
            Checked::Served => {}
            Checked::Replaced(new_url) if file == LoraFile::Main => *main_url = new_url,
            Checked::Replaced(_) => {}
            // A training changed the weights meanwhile: these files are no longer the avatar's,
            // and the new ones get their own copies and checks.
            Checked::WeightsChanged => return Ok(()),
        }
    }
    ctx.store
        .record_lora_check(avatar.id, main_url, crate::domain::now(), next_check(ctx))
        .await
        .map_err(|e| e.to_string())
}

/// What checking one of an avatar's files found.
enum Checked {
    /// FAL serves it.
    Served,
    /// FAL no longer did; it is uploaded again, at this URL.
    Replaced(String),
    /// FAL no longer did, and a training changed the avatar's weights meanwhile.
    WeightsChanged,
}

/// Asks FAL's CDN for the first byte of `url`. Served: nothing to do. Gone (404 or 410, or
/// 403, which a CDN also answers for a file it no longer has): the copy is uploaded again and
/// the avatar points at it. Anything else is an outage, tried again later.
#[tracing::instrument(skip_all, fields(avatar = %avatar_id, file = ?file))]
async fn check(
    ctx: &WorkerContext,
    avatar_id: Uuid,
    file: LoraFile,
    url: &str,
    copy_key: &str,
) -> Result<Checked, String> {
    let status = match ctx
        .fal
        .probe_file(url, CHECK_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?
    {
        FileProbe::Served => return Ok(Checked::Served),
        FileProbe::Gone(status) => status,
    };
    let length = ctx
        .blobs
        .size(copy_key)
        .await
        .map_err(|e| format!("the kept copy: {e}"))?;
    let chunks = ctx
        .blobs
        .chunks(copy_key)
        .await
        .ok_or("the kept copy is missing")?;
    let new_url = ctx
        .fal
        .upload_stream(chunks, length, "application/octet-stream", file.file_name())
        .await
        .map_err(|e| e.to_string())?;
    let replaced = ctx
        .store
        .replace_lora_url(avatar_id, file, url, &new_url, crate::domain::now())
        .await
        .map_err(|e| e.to_string())?;
    if !replaced {
        return Ok(Checked::WeightsChanged);
    }
    tracing::info!(%status, bytes = length, "FAL no longer served the LoRA file; uploaded it again from the kept copy");
    Ok(Checked::Replaced(new_url))
}
