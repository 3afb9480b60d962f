//! Numbering of events on PostgreSQL, after commit (see `events.rs`). Transactions write their
//! events unnumbered and wake this; one numbering transaction at a time, across every process
//! on the database (an advisory lock), gives the committed, unnumbered events each tenant's next
//! numbers in the order they were written. A row that commits after a numbering has run is
//! numbered by the next, above everything numbered before it: so a tenant's numbers become
//! visible in order, and a reader that saw number n never later finds one below it.
//!
//! A process that dies between a commit and its numbering leaves events unnumbered; every
//! process's numbering task also runs once a [`SWEEP`], and takes them up.
//!
//! A numbering that made events visible says so on the channel [`VISIBLE_CHANNEL`] (NOTIFY,
//! sent at its commit); every process listens, so that streams and deliveries served by any
//! replica learn of another's events at once rather than at their next look.

use super::{Pools, Store, StoreResult};
use std::time::Duration;
use tokio::sync::mpsc;

/// How often the numbering runs unasked, for events another process left unnumbered.
const SWEEP: Duration = Duration::from_secs(1);

/// Events numbered by one transaction at most; more are numbered by the next at once.
const MOST_AT_ONCE: i64 = 1000;

/// The advisory lock that keeps numbering transactions one at a time (any constant, the same in
/// every process: "falgevts").
const NUMBERING_LOCK: i64 = 0x6661_6c67_6576_7473;

/// Numbers up to `$1` committed events: each tenant's count is advanced by its share, and its
/// events take the numbers after its previous count, in the order they were written.
const NUMBER_EVENTS: &str = "WITH pending AS (\
        SELECT id, tenant, position FROM events WHERE sequence IS NULL \
        ORDER BY position LIMIT $1), \
    counted AS (SELECT tenant, COUNT(*) AS n FROM pending GROUP BY tenant), \
    advanced AS (\
        INSERT INTO event_sequences (tenant, last_sequence) SELECT tenant, n FROM counted \
        ON CONFLICT (tenant) DO UPDATE \
        SET last_sequence = event_sequences.last_sequence + EXCLUDED.last_sequence \
        RETURNING tenant, last_sequence), \
    numbered AS (\
        SELECT p.id, a.last_sequence - c.n \
            + ROW_NUMBER() OVER (PARTITION BY p.tenant ORDER BY p.position) AS sequence \
        FROM pending p JOIN counted c ON c.tenant = p.tenant \
        JOIN advanced a ON a.tenant = p.tenant) \
    UPDATE events SET sequence = numbered.sequence FROM numbered WHERE events.id = numbered.id";

/// How long the numbering task tries to start listening before it goes on without.
const LISTEN_WITHIN: Duration = Duration::from_secs(3);

/// The channel on which a numbering tells every process that events became visible.
const VISIBLE_CHANNEL: &str = "falgate_events";

/// The way to wake the numbering task; it ends when every store that could wake it is gone.
pub(super) type Wake = mpsc::Sender<()>;

impl Store {
    /// Called after a commit that wrote events: on SQLite they are visible now; on PostgreSQL
    /// their numbering is woken, and makes them visible.
    pub(super) fn events_written(&self) {
        match self.event_numbering() {
            // A wake already waiting covers this one too.
            Some(wake) => drop(wake.try_send(())),
            None => self.events_became_visible(),
        }
    }

    fn events_became_visible(&self) {
        self.visible_events
            .send_modify(|seen| *seen = seen.wrapping_add(1));
    }

    /// A watch that moves on whenever this process has made new events visible: what an event
    /// stream waits on. Events made visible by another process (a replica on the same
    /// PostgreSQL database) do not move it; a stream also looks again every little while.
    pub fn new_events(&self) -> tokio::sync::watch::Receiver<u64> {
        // Numbering must be running in a process that serves streams.
        self.event_numbering();
        self.visible_events.subscribe()
    }

    /// The numbering task's wake-up, started on first use; none on SQLite, whose events are
    /// numbered as they are written.
    pub(super) fn event_numbering(&self) -> Option<&Wake> {
        let Pools::Postgres(_) = self.pools else {
            return None;
        };
        Some(self.sequencer.get_or_init(|| {
            let (wake, woken) = mpsc::channel(1);
            tokio::spawn(number_when_woken(self.without_tasks(), woken));
            wake
        }))
    }

    /// One numbering transaction; answers how many events it numbered.
    pub(super) async fn number_events(&self) -> StoreResult<u64> {
        let mut tx = self.writer().begin().await?;
        tx.conn()
            .execute("SELECT pg_advisory_xact_lock($1)", &[NUMBERING_LOCK.into()])
            .await?;
        let numbered = tx
            .conn()
            .execute(NUMBER_EVENTS, &[MOST_AT_ONCE.into()])
            .await?;
        if numbered > 0 {
            // Sent when the numbering commits, to every process listening (this one too).
            tx.conn()
                .execute("SELECT pg_notify($1, '')", &[VISIBLE_CHANNEL.into()])
                .await?;
        }
        tx.commit().await?;
        Ok(numbered)
    }
}

async fn number_when_woken(store: Store, mut woken: mpsc::Receiver<()>) {
    let mut listener = listen(&store).await;
    loop {
        tokio::select! {
            wake = tokio::time::timeout(SWEEP, woken.recv()) => {
                if let Ok(None) = wake {
                    return;
                }
            }
            heard = next_notification(&mut listener) => {
                if heard {
                    store.events_became_visible();
                } else {
                    tracing::warn!("listening for other processes' events failed; streams and deliveries fall back to looking again every little while");
                    listener = None;
                }
                continue;
            }
        }
        loop {
            match store.number_events().await {
                Ok(numbered) => {
                    if numbered > 0 {
                        store.events_became_visible();
                    }
                    if numbered < MOST_AT_ONCE as u64 {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "numbering events failed; trying again shortly");
                    break;
                }
            }
        }
    }
}

/// A listener on [`VISIBLE_CHANNEL`]; none if it cannot be had (events are then noticed at the
/// next look).
async fn listen(store: &Store) -> Option<sqlx::postgres::PgListener> {
    let Pools::Postgres(pool) = &store.pools else {
        return None;
    };
    // A connection of its own, not one of the pool's: a listener keeps its connection for
    // good, and the pool may be as small as one.
    let options = (*pool.connect_options()).clone();
    let connect = async {
        let own = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_with(options)
            .await
            .ok()?;
        let mut listener = sqlx::postgres::PgListener::connect_with(&own).await.ok()?;
        listener.listen(VISIBLE_CHANNEL).await.ok()?;
        Some(listener)
    };
    tokio::time::timeout(LISTEN_WITHIN, connect)
        .await
        .ok()
        .flatten()
}

/// Waits for the next notification: `true` when one came, `false` when the listener failed
/// (it reconnects by itself on a lost connection; this is what it could not recover from).
/// Without a listener, waits forever.
async fn next_notification(listener: &mut Option<sqlx::postgres::PgListener>) -> bool {
    match listener {
        Some(listener) => listener.recv().await.is_ok(),
        None => std::future::pending().await,
    }
}
