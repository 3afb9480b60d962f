//! Backoff for calls to FAL: exponential with jitter so that many jobs failing together
//! (FAL outage) do not retry in lockstep.

use std::time::Duration;

use rand::Rng as _;

/// Longest wait we accept from a `Retry-After`, so a bogus header cannot park a job.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Delay before retry number `attempt` (0 = first retry): `min(base·2^attempt, max)`
/// scaled by a random factor in `[0.5, 1.0]` ("equal jitter": never zero, never above max).
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let exp = base.saturating_mul(2u32.saturating_pow(attempt.min(31)));
    let capped = exp.min(max);
    let factor = rand::rng().random_range(0.5..=1.0);
    capped.mul_f64(factor)
}

/// Like [`backoff`], but FAL's `Retry-After` wins when it asks for longer: it knows when
/// capacity returns, we only guess.
pub fn next_delay(
    attempt: u32,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    let ours = backoff(attempt, base, max);
    match retry_after {
        Some(ra) => ours.max(ra.min(MAX_RETRY_AFTER)),
        None => ours,
    }
}

/// Parses `Retry-After` given in seconds. HTTP dates are ignored: FAL is not known to
/// send them and a wrong clock would turn them into nonsense.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    v.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
        .map(Duration::from_secs_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(10);
        for attempt in 0..40 {
            let want = base
                .saturating_mul(2u32.saturating_pow(attempt.min(31)))
                .min(max);
            for _ in 0..20 {
                let d = backoff(attempt, base, max);
                assert!(
                    d >= want / 2 && d <= want,
                    "attempt {attempt}: {d:?} vs {want:?}"
                );
            }
        }
    }

    #[test]
    fn retry_after_is_honoured_and_bounded() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        assert_eq!(
            next_delay(0, base, max, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        assert_eq!(
            next_delay(0, base, max, Some(Duration::from_secs(999_999))),
            MAX_RETRY_AFTER
        );
        assert!(next_delay(5, base, max, Some(Duration::ZERO)) >= Duration::from_millis(500));
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }
}
