//! How the store's resource files reach either database without knowing which: statements
//! take their parameters as [`Arg`]s, bound in one place, and rows decode into structs that
//! derive `sqlx::FromRow` for both backends. Reads go to [`Store::fetch_one`] and its kin,
//! writes through [`Store::writer`], and a transaction's statements through [`Tx::conn`].

use super::{Pools, Store, StoreError, StoreResult, postgres, sqlite};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::types::Json;
use sqlx::{
    Arguments, Database, Encode, FromRow, PgConnection, PgPool, Postgres, Sqlite, SqliteConnection,
    SqlitePool, Type,
};
use uuid::Uuid;

/// The statements whose spelling differs between SQLite and PostgreSQL; each backend's file
/// has its own (`sqlite::DIALECT`, `postgres::DIALECT`), and [`Store::dialect`] picks.
pub(super) struct Dialect {
    /// An avatar's owner, status, training and LoRA copy, read under a lock on its row.
    pub lock_avatar: &'static str,
    pub get_job: String,
    pub list_jobs: String,
    pub list_avatars: String,
    pub update_job: &'static str,
    pub claim_submit: String,
    pub claim_poll: String,
    pub next_due_submit: &'static str,
    pub next_due_poll: &'static str,
    /// How new jobs and their first history rows are inserted (`jobs::insert_new_jobs`).
    pub insert_jobs: NewJobRows,
    /// A batch's row, read under a lock where the backend has row locks, so that the last of
    /// its jobs to finish sees the others finished.
    pub lock_batch: &'static str,
    /// How a tenant's events get their numbers (`events.rs`).
    pub event_numbering: EventNumbering,
    /// Enabled webhook endpoints with events not yet planned (`$1` of them at most), passing
    /// over those another process is planning.
    pub endpoints_to_plan: &'static str,
    /// Due deliveries of enabled endpoints, leased (`$1` now, `$2` the lease's end, `$3` how
    /// many), passing over those another process is claiming.
    pub claim_deliveries: &'static str,
}

/// How a tenant's events are numbered 1, 2, 3… so that they become visible in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EventNumbering {
    /// In the transaction that writes them: where there is one writer at a time (SQLite),
    /// this costs no one a wait.
    WhenWritten,
    /// After commit, by one numbering transaction at a time (`sequencer.rs`): where writers
    /// run side by side (PostgreSQL), numbering in the writing transaction would make every
    /// event-writing transaction of a tenant wait for the previous one's commit.
    AfterCommit,
}

/// The statements that insert new jobs with their first history rows, a few at a time.
pub(super) enum NewJobRows {
    /// Two statements of bound values per chunk: `jobs[n - 1]` inserts `n` jobs, each
    /// [`NewJobRows::JOB_VALUES`] values in `NewJob` order (id, tenant, kind, avatar_id,
    /// batch_id, endpoint, input, status, next_attempt_at, sandbox, idempotency_key,
    /// created_at), and `events[n - 1]` their history rows (job id, at, status, source).
    Values {
        jobs: Vec<String>,
        events: Vec<String>,
    },
    /// One statement per chunk: the jobs as a JSON array (`$1`) and the rows' source (`$2`).
    Json(&'static str),
}

impl NewJobRows {
    pub const JOB_VALUES: usize = 12;
    pub const EVENT_VALUES: usize = 4;
}

/// One value for a statement's placeholder. A NULL keeps its type (`None` in its variant):
/// PostgreSQL needs to know what a NULL parameter is.
#[derive(Debug, Clone, Copy)]
pub(super) enum Arg<'a> {
    Uuid(Option<Uuid>),
    Text(Option<&'a str>),
    I64(Option<i64>),
    I32(Option<i32>),
    Bool(Option<bool>),
    Time(Option<DateTime<Utc>>),
    Json(Option<&'a Value>),
    Bytes(&'a [u8]),
}

impl From<Uuid> for Arg<'_> {
    fn from(value: Uuid) -> Self {
        Self::Uuid(Some(value))
    }
}

impl From<Option<Uuid>> for Arg<'_> {
    fn from(value: Option<Uuid>) -> Self {
        Self::Uuid(value)
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(value: &'a str) -> Self {
        Self::Text(Some(value))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(value: Option<&'a str>) -> Self {
        Self::Text(value)
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(value: &'a String) -> Self {
        Self::Text(Some(value))
    }
}

impl<'a> From<&'a Option<String>> for Arg<'a> {
    fn from(value: &'a Option<String>) -> Self {
        Self::Text(value.as_deref())
    }
}

impl From<i64> for Arg<'_> {
    fn from(value: i64) -> Self {
        Self::I64(Some(value))
    }
}

impl From<Option<i64>> for Arg<'_> {
    fn from(value: Option<i64>) -> Self {
        Self::I64(value)
    }
}

impl From<i32> for Arg<'_> {
    fn from(value: i32) -> Self {
        Self::I32(Some(value))
    }
}

impl From<Option<i32>> for Arg<'_> {
    fn from(value: Option<i32>) -> Self {
        Self::I32(value)
    }
}

impl From<bool> for Arg<'_> {
    fn from(value: bool) -> Self {
        Self::Bool(Some(value))
    }
}

impl From<Option<bool>> for Arg<'_> {
    fn from(value: Option<bool>) -> Self {
        Self::Bool(value)
    }
}

impl From<DateTime<Utc>> for Arg<'_> {
    fn from(value: DateTime<Utc>) -> Self {
        Self::Time(Some(value))
    }
}

impl From<Option<DateTime<Utc>>> for Arg<'_> {
    fn from(value: Option<DateTime<Utc>>) -> Self {
        Self::Time(value)
    }
}

impl<'a> From<&'a Value> for Arg<'a> {
    fn from(value: &'a Value) -> Self {
        Self::Json(Some(value))
    }
}

impl<'a> From<Option<&'a Value>> for Arg<'a> {
    fn from(value: Option<&'a Value>) -> Self {
        Self::Json(value)
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(value: &'a [u8]) -> Self {
        Self::Bytes(value)
    }
}

/// Binds `args` for either backend. Generic rather than written twice: the bounds only say
/// that each backend can encode every kind of [`Arg`].
fn bind_all<'a, DB: Database>(args: &[Arg<'a>]) -> StoreResult<DB::Arguments>
where
    Option<Uuid>: Encode<'a, DB> + Type<DB>,
    Option<&'a str>: Encode<'a, DB> + Type<DB>,
    Option<i64>: Encode<'a, DB> + Type<DB>,
    Option<i32>: Encode<'a, DB> + Type<DB>,
    Option<bool>: Encode<'a, DB> + Type<DB>,
    Option<DateTime<Utc>>: Encode<'a, DB> + Type<DB>,
    Option<Json<&'a Value>>: Encode<'a, DB> + Type<DB>,
    &'a [u8]: Encode<'a, DB> + Type<DB>,
{
    let mut bound = DB::Arguments::default();
    for (index, arg) in args.iter().enumerate() {
        match *arg {
            Arg::Uuid(value) => bound.add(value),
            Arg::Text(value) => bound.add(value),
            Arg::I64(value) => bound.add(value),
            Arg::I32(value) => bound.add(value),
            Arg::Bool(value) => bound.add(value),
            Arg::Time(value) => bound.add(value),
            Arg::Json(value) => bound.add(value.map(Json)),
            Arg::Bytes(value) => bound.add(value),
        }
        .map_err(|e| StoreError::Database(format!("parameter ${}: {e}", index + 1)))?;
    }
    Ok(bound)
}

/// A row type that decodes from both backends' rows (what `#[derive(sqlx::FromRow)]` and
/// tuples of plain columns give).
pub(super) trait Row:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}

impl<T> Row for T where T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{}

/// One connection, of either backend, to run a statement on.
pub(super) enum Conn<'c> {
    Sqlite(&'c mut SqliteConnection),
    Postgres(&'c mut PgConnection),
}

impl Conn<'_> {
    /// Runs a statement; answers how many rows it wrote.
    pub async fn execute(self, sql: &'static str, args: &[Arg<'_>]) -> StoreResult<u64> {
        let done = match self {
            Self::Sqlite(conn) => sqlx::query_with(sql, bind_all::<Sqlite>(args)?)
                .execute(conn)
                .await?
                .rows_affected(),
            Self::Postgres(conn) => sqlx::query_with(sql, bind_all::<Postgres>(args)?)
                .execute(conn)
                .await?
                .rows_affected(),
        };
        Ok(done)
    }

    pub async fn fetch_optional<R: Row>(
        self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> StoreResult<Option<R>> {
        let row = match self {
            Self::Sqlite(conn) => {
                sqlx::query_as_with(sql, bind_all::<Sqlite>(args)?)
                    .fetch_optional(conn)
                    .await?
            }
            Self::Postgres(conn) => {
                sqlx::query_as_with(sql, bind_all::<Postgres>(args)?)
                    .fetch_optional(conn)
                    .await?
            }
        };
        Ok(row)
    }

    pub async fn fetch_one<R: Row>(self, sql: &'static str, args: &[Arg<'_>]) -> StoreResult<R> {
        self.fetch_optional(sql, args)
            .await?
            .ok_or_else(|| sqlx::Error::RowNotFound.into())
    }

    pub async fn fetch_all<R: Row>(
        self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> StoreResult<Vec<R>> {
        let rows = match self {
            Self::Sqlite(conn) => {
                sqlx::query_as_with(sql, bind_all::<Sqlite>(args)?)
                    .fetch_all(conn)
                    .await?
            }
            Self::Postgres(conn) => {
                sqlx::query_as_with(sql, bind_all::<Postgres>(args)?)
                    .fetch_all(conn)
                    .await?
            }
        };
        Ok(rows)
    }
}

/// A connection lent by a pool, given back when dropped.
pub(super) enum Pooled {
    Sqlite(PoolConnection<Sqlite>),
    Postgres(PoolConnection<Postgres>),
}

impl Pooled {
    pub fn conn(&mut self) -> Conn<'_> {
        match self {
            Self::Sqlite(conn) => Conn::Sqlite(conn),
            Self::Postgres(conn) => Conn::Postgres(conn),
        }
    }
}

/// A write transaction, started the backend's way ([`Writer::begin`]). Dropped without
/// [`commit`](Self::commit), it rolls back.
pub(super) enum Tx {
    Sqlite(sqlx::Transaction<'static, Sqlite>),
    Postgres(sqlx::Transaction<'static, Postgres>),
}

impl Tx {
    pub fn conn(&mut self) -> Conn<'_> {
        match self {
            Self::Sqlite(tx) => Conn::Sqlite(tx),
            Self::Postgres(tx) => Conn::Postgres(tx),
        }
    }

    /// The statements spelt this transaction's backend's way.
    pub fn dialect(&self) -> &'static Dialect {
        match self {
            Self::Sqlite(_) => &sqlite::DIALECT,
            Self::Postgres(_) => &postgres::DIALECT,
        }
    }

    pub async fn commit(self) -> StoreResult<()> {
        match self {
            Self::Sqlite(tx) => tx.commit().await?,
            Self::Postgres(tx) => tx.commit().await?,
        }
        Ok(())
    }
}

/// The pool every write goes through. On SQLite it holds a single connection, so writers wait
/// their turn in the pool's fair queue rather than in SQLite's busy handler; a write path
/// holds it for one statement or one transaction and never asks for it again meanwhile.
#[derive(Clone, Copy)]
pub(super) enum Writer<'s> {
    Sqlite(&'s SqlitePool),
    Postgres(&'s PgPool),
}

impl Writer<'_> {
    /// Starts a read-then-write transaction.
    pub async fn begin(self) -> StoreResult<Tx> {
        Ok(match self {
            Self::Sqlite(pool) => Tx::Sqlite(sqlite::begin_write(pool).await?),
            Self::Postgres(pool) => Tx::Postgres(postgres::begin_write(pool).await?),
        })
    }

    /// Runs one writing statement on its own; answers how many rows it wrote.
    pub async fn execute(self, sql: &'static str, args: &[Arg<'_>]) -> StoreResult<u64> {
        let mut conn = match self {
            Self::Sqlite(pool) => Pooled::Sqlite(pool.acquire().await?),
            Self::Postgres(pool) => Pooled::Postgres(pool.acquire().await?),
        };
        conn.conn().execute(sql, args).await
    }
}

impl Store {
    /// The one door for writes.
    pub(super) fn writer(&self) -> Writer<'_> {
        match &self.pools {
            Pools::Sqlite(pools) => Writer::Sqlite(&pools.writer),
            Pools::Postgres(pool) => Writer::Postgres(pool),
        }
    }

    /// A connection for reading (on SQLite, from the pool that may not write).
    pub(super) async fn reader(&self) -> StoreResult<Pooled> {
        Ok(match &self.pools {
            Pools::Sqlite(pools) => Pooled::Sqlite(pools.readers.acquire().await?),
            Pools::Postgres(pool) => Pooled::Postgres(pool.acquire().await?),
        })
    }

    /// The statements whose spelling differs between the backends.
    pub(super) fn dialect(&self) -> &'static Dialect {
        match &self.pools {
            Pools::Sqlite(_) => &sqlite::DIALECT,
            Pools::Postgres(_) => &postgres::DIALECT,
        }
    }

    pub(super) async fn fetch_optional<R: Row>(
        &self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> StoreResult<Option<R>> {
        self.reader().await?.conn().fetch_optional(sql, args).await
    }

    pub(super) async fn fetch_one<R: Row>(
        &self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> StoreResult<R> {
        self.reader().await?.conn().fetch_one(sql, args).await
    }

    pub(super) async fn fetch_all<R: Row>(
        &self,
        sql: &'static str,
        args: &[Arg<'_>],
    ) -> StoreResult<Vec<R>> {
        self.reader().await?.conn().fetch_all(sql, args).await
    }
}
