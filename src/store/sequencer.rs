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
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio::sync::mpsc;
use uuid::Uuid;

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
    UPDATE events SET sequence = numbered.sequence FROM numbered WHERE events.id = numbered.id \
    RETURNING events.tenant";

/// How long the numbering task tries to start listening before it goes on without.
const LISTEN_WITHIN: Duration = Duration::from_secs(3);

/// How long after listening failed the numbering task tries again.
const LISTEN_AGAIN: Duration = Duration::from_secs(5);

/// The channel on which a numbering tells every process that events became visible.
const VISIBLE_CHANNEL: &str = "falgate_events";

/// News of tenants' events kept for a listener that has not read them yet; one that falls
/// further behind is told "anything may have changed".
pub(super) const NEWS_BACKLOG: usize = 1024;

/// Tenants named in one notification at most; more make it say "any tenant".
const MOST_TENANTS_NAMED: usize = 100;

/// A listener's news of events becoming visible, by tenant.
pub struct NewEvents {
    news: broadcast::Receiver<Uuid>,
}

impl NewEvents {
    /// Forgets what was heard so far, so that what comes next is news: called before reading
    /// the events, so that none made visible meanwhile goes unnoticed.
    pub fn mark_seen(&mut self) {
        while !matches!(
            self.news.try_recv(),
            Err(TryRecvError::Empty | TryRecvError::Closed)
        ) {}
    }

    /// Waits until events of `tenant` (of any tenant, for `None`) may have become visible.
    pub async fn changed(&mut self, tenant: Option<Uuid>) {
        loop {
            match self.news.recv().await {
                Ok(of) if of.is_nil() || tenant.is_none_or(|tenant| tenant == of) => return,
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => return,
                Err(RecvError::Closed) => std::future::pending().await,
            }
        }
    }
}

/// The way to wake the numbering task; it ends when every store that could wake it is gone.
pub(super) type Wake = mpsc::Sender<()>;

impl Store {
    /// Called after a commit that wrote events: on SQLite they are visible now; on PostgreSQL
    /// their numbering is woken, and makes them visible.
    pub(super) fn events_written(&self, tenant: Uuid) {
        match self.event_numbering() {
            // A wake already waiting covers this one too.
            Some(wake) => drop(wake.try_send(())),
            None => self.events_became_visible(&[tenant]),
        }
    }

    /// Tells this process's listeners that events of `tenants` became visible (`Uuid::nil()`:
    /// of any tenant).
    fn events_became_visible(&self, tenants: &[Uuid]) {
        for tenant in tenants {
            // No one listening is no one to tell.
            let _ = self.visible_events.send(*tenant);
        }
    }

    /// News of events becoming visible, in this process or (on PostgreSQL) any other: what
    /// event streams and the webhook deliverer wait on.
    pub fn new_events(&self) -> NewEvents {
        // Numbering must be running in a process that serves streams.
        self.event_numbering();
        NewEvents {
            news: self.visible_events.subscribe(),
        }
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

    /// One numbering transaction; answers how many events it numbered, and their tenants.
    pub(super) async fn number_events(&self) -> StoreResult<(usize, Vec<Uuid>)> {
        let mut tx = self.writer().begin().await?;
        tx.conn()
            .execute("SELECT pg_advisory_xact_lock($1)", &[NUMBERING_LOCK.into()])
            .await?;
        let rows: Vec<(Uuid,)> = tx
            .conn()
            .fetch_all(NUMBER_EVENTS, &[MOST_AT_ONCE.into()])
            .await?;
        let numbered = rows.len();
        let mut tenants: Vec<Uuid> = rows.into_iter().map(|(tenant,)| tenant).collect();
        tenants.sort_unstable();
        tenants.dedup();
        if numbered > 0 {
            // Sent when the numbering commits, to every process listening (this one too): the
            // tenants, or nothing for "any tenant" when they are many.
            let payload = match tenants.len() <= MOST_TENANTS_NAMED {
                true => tenants
                    .iter()
                    .map(Uuid::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                false => String::new(),
            };
            tx.conn()
                .execute(
                    "SELECT pg_notify($1, $2)",
                    &[VISIBLE_CHANNEL.into(), payload.as_str().into()],
                )
                .await?;
        }
        tx.commit().await?;
        Ok((numbered, tenants))
    }
}

async fn number_when_woken(store: Store, mut woken: mpsc::Receiver<()>) {
    let mut listener = listen(&store).await;
    let mut listen_again_at = tokio::time::Instant::now() + LISTEN_AGAIN;
    loop {
        tokio::select! {
            wake = tokio::time::timeout(SWEEP, woken.recv()) => {
                if let Ok(None) = wake {
                    return;
                }
            }
            heard = next_notification(&mut listener) => {
                match heard {
                    Heard::Tenants(tenants) => store.events_became_visible(&tenants),
                    Heard::Lost => {
                        // What was sent meanwhile is lost: every stream looks again now.
                        tracing::info!("the connection listening for events was lost; listening again");
                        store.events_became_visible(&[Uuid::nil()]);
                    }
                    Heard::Failed => {
                        tracing::warn!("listening for other processes' events failed; streams and deliveries look again every little while until listening is back");
                        listener = None;
                        listen_again_at = tokio::time::Instant::now() + LISTEN_AGAIN;
                    }
                }
                continue;
            }
        }
        if listener.is_none() && tokio::time::Instant::now() >= listen_again_at {
            listener = listen(&store).await;
            listen_again_at = tokio::time::Instant::now() + LISTEN_AGAIN;
            if listener.is_some() {
                store.events_became_visible(&[Uuid::nil()]);
            }
        }
        loop {
            match store.number_events().await {
                Ok((numbered, tenants)) => {
                    store.events_became_visible(&tenants);
                    if numbered < MOST_AT_ONCE as usize {
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

/// What the listener heard.
enum Heard {
    /// Events of these tenants (`Uuid::nil()`: of any) became visible.
    Tenants(Vec<Uuid>),
    /// Its connection was lost; it connects again when asked next.
    Lost,
    /// It cannot go on.
    Failed,
}

/// Waits for what the listener hears next. Without a listener, waits forever.
async fn next_notification(listener: &mut Option<sqlx::postgres::PgListener>) -> Heard {
    let Some(listener) = listener else {
        return std::future::pending().await;
    };
    let notification = match listener.try_recv().await {
        Ok(Some(notification)) => notification,
        Ok(None) => return Heard::Lost,
        Err(_) => return Heard::Failed,
    };
    let named: Vec<Uuid> = notification
        .payload()
        .split(',')
        .filter_map(|tenant| tenant.parse().ok())
        .collect();
    Heard::Tenants(match named.is_empty() {
        true => vec![Uuid::nil()],
        false => named,
    })
}
