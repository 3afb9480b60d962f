//! Keeps a copy of every trained LoRA file in falgate's own storage: FAL's file URLs expire,
//! and an avatar whose weights are gone is lost. Avatars whose current weights have no copy are
//! picked up after each training; one whose file could not be fetched is tried again later,
//! with backoff, so that a few dead URLs never hold up the others.
//!
//! It also checks, every `FALGATE_LORA_CHECK_SECS`, that FAL still serves each kept LoRA file,
//! because generations hand FAL that URL. A file FAL no longer serves is uploaded again from
//! the copy, and the avatar points at the new upload.

use super::IDLE_WAIT;
use crate::app::AppState;
use crate::store::LoraCopy;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use uuid::Uuid;

/// Largest LoRA file kept (FAL's are tens to a few hundred MB).
const MAX_LORA_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// How long an avatar whose copy failed waits first; doubled on each further failure.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// How long one download may take: the shared client's limit is sized for API calls.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(1800);
/// Copies made per round.
const PER_ROUND: usize = 4;

/// How long one check of a FAL file may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(state: AppState, mut stopping: watch::Receiver<bool>) {
    let mut backoff = Backoff::default();
    let mut check_backoff = Backoff::default();
    while !*stopping.borrow() {
        match state.store.avatars_missing_lora_copy(64).await {
            Ok(avatars) => {
                let now = Instant::now();
                let due: Vec<(Uuid, String)> = avatars
                    .into_iter()
                    .filter_map(|avatar| Some((avatar.id, avatar.lora_url?)))
                    .filter(|key| backoff.is_due(key, now))
                    .take(PER_ROUND)
                    .collect();
                for (avatar_id, url) in due {
                    match keep(&state, avatar_id, &url).await {
                        Ok(()) => backoff.succeeded(avatar_id, url),
                        Err(err) => {
                            tracing::warn!(avatar = %avatar_id, error = %err, "could not keep a copy of a LoRA file");
                            backoff.failed(avatar_id, url);
                        }
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "could not look for LoRA files to keep"),
        }
        let checked_before = crate::domain::now()
            - chrono::Duration::from_std(state.config.workers.lora_check_interval)
                .unwrap_or(chrono::Duration::MAX);
        match state.store.avatars_due_lora_check(checked_before, 64).await {
            Ok(avatars) => {
                let now = Instant::now();
                let due: Vec<(Uuid, String, String)> = avatars
                    .into_iter()
                    .filter_map(|avatar| Some((avatar.id, avatar.lora_url?, avatar.lora_copy?.key)))
                    .filter(|(id, url, _)| check_backoff.is_due(&(*id, url.clone()), now))
                    .take(PER_ROUND)
                    .collect();
                for (avatar_id, url, copy_key) in due {
                    match check(&state, avatar_id, &url, &copy_key).await {
                        Ok(()) => check_backoff.succeeded(avatar_id, url),
                        Err(err) => {
                            tracing::warn!(avatar = %avatar_id, error = %err, "could not check FAL's LoRA file");
                            check_backoff.failed(avatar_id, url);
                        }
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "could not look for LoRA files to check"),
        }
        tokio::select! {
            () = state.wake.keeper.notified() => {}
            () = tokio::time::sleep(IDLE_WAIT) => {}
            _ = stopping.changed() => {}
        }
    }
}

#[tracing::instrument(skip_all, fields(avatar = %avatar_id))]
async fn keep(state: &AppState, avatar_id: Uuid, url: &str) -> Result<(), String> {
    // FAL's CDN files are public: no key is sent.
    let response = state
        .fal
        .http()
        .get(url)
        .timeout(DOWNLOAD_TIMEOUT)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    if !response.status().is_success() {
        return Err(format!("FAL's file answered {}", response.status()));
    }
    // Streamed to a file while hashed: a LoRA can be hundreds of MB, and is never held whole.
    let mut file = state.blobs.writer().await.map_err(|e| e.to_string())?;
    let mut hasher = Sha256::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| e.without_url().to_string())?;
        if file.written() + chunk.len() as u64 > MAX_LORA_BYTES {
            return Err("the LoRA file is larger than 2 GiB".into());
        }
        hasher.update(&chunk);
        file.write(&chunk).await.map_err(|e| e.to_string())?;
    }
    let sha256 = hex::encode(hasher.finalize());
    let copy = LoraCopy {
        key: format!("loras/{avatar_id}/{sha256}.safetensors"),
        sha256,
        bytes: file.written() as i64,
    };
    file.finish(&copy.key).await.map_err(|e| e.to_string())?;
    match state
        .store
        .record_lora_copy(avatar_id, url, &copy)
        .await
        .map_err(|e| e.to_string())?
    {
        Some(replaced) => {
            tracing::info!(bytes = copy.bytes, "kept a copy of the LoRA file");
            if let Some(old) = replaced {
                let _ = state.blobs.delete(&old).await;
            }
        }
        // A newer training replaced the weights (or the avatar was deleted) meanwhile.
        None => {
            let _ = state.blobs.delete(&copy.key).await;
        }
    }
    Ok(())
}

/// Avatars whose file work failed, and when each may be tried again: a few dead URLs never
/// hold up the others, nor are they hammered.
#[derive(Default)]
struct Backoff(HashMap<(Uuid, String), (Instant, u32)>);

impl Backoff {
    fn is_due(&self, key: &(Uuid, String), now: Instant) -> bool {
        self.0.get(key).is_none_or(|(at, _)| *at <= now)
    }

    fn succeeded(&mut self, avatar_id: Uuid, url: String) {
        self.0.remove(&(avatar_id, url));
    }

    fn failed(&mut self, avatar_id: Uuid, url: String) {
        let entry = self
            .0
            .entry((avatar_id, url))
            .or_insert((Instant::now(), 0));
        entry.0 = Instant::now() + RETRY_AFTER_FAILURE * 2u32.pow(entry.1.min(6));
        entry.1 += 1;
    }
}

/// Asks FAL's CDN for the first byte of `url`. Served: noted. Gone (404, 410, 403): the
/// copy is uploaded again and the avatar points at it. Anything else is an outage, tried
/// again later.
#[tracing::instrument(skip_all, fields(avatar = %avatar_id))]
async fn check(state: &AppState, avatar_id: Uuid, url: &str, copy_key: &str) -> Result<(), String> {
    // FAL's CDN files are public: no key is sent. A range keeps a large file from being sent.
    let response = state
        .fal
        .http()
        .get(url)
        .header(reqwest::header::RANGE, "bytes=0-0")
        .timeout(CHECK_TIMEOUT)
        .send()
        .await
        .map_err(|e| e.without_url().to_string())?;
    let status = response.status();
    drop(response);
    if status.is_success() {
        return state
            .store
            .record_lora_check(avatar_id, url, crate::domain::now())
            .await
            .map_err(|e| e.to_string());
    }
    if !matches!(status.as_u16(), 403 | 404 | 410) {
        return Err(format!("FAL's file answered {status}"));
    }
    let length = state
        .blobs
        .size(copy_key)
        .await
        .map_err(|e| format!("the kept copy: {e}"))?;
    let chunks = state
        .blobs
        .chunks(copy_key)
        .await
        .ok_or("the kept copy is missing")?;
    let new_url = state
        .fal
        .upload_stream(
            chunks,
            length,
            "application/octet-stream",
            "pytorch_lora_weights.safetensors",
        )
        .await
        .map_err(|e| e.to_string())?;
    let replaced = state
        .store
        .replace_lora_url(avatar_id, url, &new_url, crate::domain::now())
        .await
        .map_err(|e| e.to_string())?;
    if replaced {
        tracing::info!(%status, bytes = length, "FAL no longer served the LoRA file; uploaded it again from the kept copy");
    }
    Ok(())
}
