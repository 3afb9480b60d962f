//! Keeps a copy of every trained LoRA file in falgate's own storage: FAL's file URLs expire,
//! and an avatar whose weights are gone is lost. Avatars whose current weights have no copy are
//! picked up after each training; one whose file could not be fetched is tried again later,
//! with backoff, so that a few dead URLs never hold up the others.

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

pub async fn run(state: AppState, mut stopping: watch::Receiver<bool>) {
    let mut backoff: HashMap<(Uuid, String), (Instant, u32)> = HashMap::new();
    while !*stopping.borrow() {
        match state.store.avatars_missing_lora_copy(64).await {
            Ok(avatars) => {
                let now = Instant::now();
                let due: Vec<(Uuid, String)> = avatars
                    .into_iter()
                    .filter_map(|avatar| Some((avatar.id, avatar.lora_url?)))
                    .filter(|key| backoff.get(key).is_none_or(|(at, _)| *at <= now))
                    .take(PER_ROUND)
                    .collect();
                for (avatar_id, url) in due {
                    match keep(&state, avatar_id, &url).await {
                        Ok(()) => {
                            backoff.remove(&(avatar_id, url));
                        }
                        Err(err) => {
                            tracing::warn!(avatar = %avatar_id, error = %err, "could not keep a copy of a LoRA file");
                            let entry = backoff.entry((avatar_id, url)).or_insert((now, 0));
                            entry.0 =
                                Instant::now() + RETRY_AFTER_FAILURE * 2u32.pow(entry.1.min(6));
                            entry.1 += 1;
                        }
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "could not look for LoRA files to keep"),
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
