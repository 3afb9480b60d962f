//! Waiting for what the app (or a process the test started) does in the background: polling
//! under a deadline, never a bare sleep.

use std::fmt::Display;
use std::time::Duration;
use tokio::time::Instant;

/// How long a test waits for something the app does in the background.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// How often a wait looks again: short, as the emulator runs at a thousandth of FAL's pace.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A wait for `what`, to be awaited with [`Eventually::until`]; [`PATIENCE`] and
/// [`POLL_INTERVAL`] unless told otherwise.
pub fn eventually(what: impl Display) -> Eventually {
    Eventually {
        what: what.to_string(),
        within: PATIENCE,
        every: POLL_INTERVAL,
    }
}

/// A description of what is awaited (for the failure message), a deadline and a poll interval.
#[must_use = "a wait does nothing until `until` (or `or_last`) is awaited"]
pub struct Eventually {
    what: String,
    within: Duration,
    every: Duration,
}

impl Eventually {
    pub fn within(self, within: Duration) -> Self {
        Self { within, ..self }
    }

    pub fn every(self, every: Duration) -> Self {
        Self { every, ..self }
    }

    /// The first `Some` the probe answers; the test fails if none comes before the deadline.
    pub async fn until<T>(self, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
        let what = self.what.clone();
        let within = self.within;
        match self.or_last(async || probe().await.ok_or(())).await {
            Ok(found) => found,
            Err(()) => panic!("timed out after {within:?} waiting for {what}"),
        }
    }

    /// The first `Ok` the probe answers, or, once the deadline has passed, its last `Err`: for a
    /// wait whose failure should show what was last seen, or that judges whatever it found.
    pub async fn or_last<T, E>(self, mut probe: impl AsyncFnMut() -> Result<T, E>) -> Result<T, E> {
        let deadline = Instant::now() + self.within;
        loop {
            let seen = probe().await;
            if seen.is_ok() || Instant::now() >= deadline {
                return seen;
            }
            tokio::time::sleep(self.every).await;
        }
    }
}

/// Runs `check` (which asserts) every `every` until `window` has passed: for something that must
/// not happen, where waiting is the only way to see it did not.
pub async fn throughout(window: Duration, every: Duration, mut check: impl AsyncFnMut()) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        check().await;
        tokio::time::sleep(every).await;
    }
}
