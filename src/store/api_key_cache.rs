//! Live API keys, remembered briefly so that a request does not cost a database read just to
//! learn who sent it. A revocation must still bite within a second everywhere: a replica
//! trusts what it read for at most [`TRUSTED_FOR`], and in this process a revocation voids
//! every remembered key at once, before anyone can be told it is done.

use super::{ApiKeyCredential, Store, StoreResult};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a key read from the database is believed without asking again: the bound on how
/// late a revocation made by another process (a replica, the CLI) is seen here.
pub const TRUSTED_FOR: Duration = Duration::from_secs(1);

/// Keys remembered at most; only keys that authenticated are, so no client can grow it.
const CAPACITY: usize = 10_000;

/// Revocations made through any store of this process, so that a cache can tell its entries
/// predate one.
static REVOCATIONS: AtomicU64 = AtomicU64::new(0);

/// Called once a revocation is committed.
pub(super) fn note_revocation() {
    REVOCATIONS.fetch_add(1, Ordering::SeqCst);
}

struct Remembered {
    credential: ApiKeyCredential,
    read_at: Instant,
    revocations: u64,
}

impl Remembered {
    fn current(&self, now: Instant, revocations: u64) -> bool {
        self.revocations == revocations && now.duration_since(self.read_at) < TRUSTED_FOR
    }
}

/// Live keys by the hash of their secret.
#[derive(Default)]
pub struct ApiKeyCache {
    keys: Mutex<HashMap<String, Remembered>>,
}

impl ApiKeyCache {
    /// The live key with this hash, as [`Store::find_live_api_key`] answers, at most
    /// [`TRUSTED_FOR`] old.
    pub async fn find_live(
        &self,
        store: &Store,
        hash: &str,
    ) -> StoreResult<Option<ApiKeyCredential>> {
        // Both read before the database is: an entry then never outlives a revocation that
        // committed after its read began.
        let read_at = Instant::now();
        let revocations = REVOCATIONS.load(Ordering::SeqCst);
        if let Some(known) = self.lock().get(hash)
            && known.current(read_at, revocations)
        {
            return Ok(Some(known.credential.clone()));
        }
        let found = store.find_live_api_key(hash).await?;
        if let Some(credential) = &found {
            let mut keys = self.lock();
            if keys.len() >= CAPACITY {
                let now = Instant::now();
                let latest = REVOCATIONS.load(Ordering::SeqCst);
                keys.retain(|_, known| known.current(now, latest));
                if keys.len() >= CAPACITY {
                    keys.clear();
                }
            }
            keys.insert(
                hash.to_owned(),
                Remembered {
                    credential: credential.clone(),
                    read_at,
                    revocations,
                },
            );
        }
        Ok(found)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Remembered>> {
        // The map holds no invariant a panic could break half-way.
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
