//! The accept loop: serves the router over HTTP/1.1 and bounds what each client connection may
//! hold.
//!
//! Left alone, a connection lives as long as its client likes: one that never finishes its
//! headers, or sits idle between requests, keeps a file descriptor forever, and enough of them
//! stop the process from accepting anything, health probes included. Here every connection has a
//! supervisor that closes it when the head of a request is slow to arrive or when it waits too
//! long for its next request, and the number of connections is capped below the open-files
//! limit.
//!
//! At the cap a newcomer is not turned away: the connection that has gone longest without a
//! request in flight is closed to make room. An idle connection costs its client only a reconnect
//! (clients must expect a kept-alive connection to close), while refusing newcomers would let a
//! few hundred idle sockets take the service down; the requests being served are never touched.
//! Only when every connection has a request in flight does a newcomer go to a small reserve that
//! answers the health probes and turns everything else away with a 503, so that an orchestrator
//! sees a busy process, not a dead one. Beyond that reserve a connection is closed as soon as it
//! is accepted, which tells its client at once instead of leaving it in the kernel's backlog.
//!
//! HTTP/1.1 only: the bookkeeping relies on a connection carrying one request at a time, and
//! TLS and HTTP/2 end at the proxy in front.

use crate::config::ConnectionLimits;
use crate::error::ApiError;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Request, Response, header};
use axum::response::IntoResponse;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt;

/// The largest request head (request line and headers) a connection may buffer.
const MAX_HEAD_BYTES: usize = 64 << 10;

/// Connections beyond the cap that may still ask for `/healthz` and `/readyz` while every
/// capped connection has a request in flight.
const PROBE_RESERVE: usize = 8;

/// File descriptors kept for everything that is not a client connection or the database pool:
/// the listener, connections to FAL, files being written, logs.
const OTHER_FILES: usize = 64;

/// How long the accept loop rests after an error that is not a client's (out of file
/// descriptors, out of memory), doubling up to the maximum while it lasts.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// The bounds in force.
#[derive(Debug, Clone)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    /// The configured limits, with the cap lowered when the process may not open that many
    /// files beside its database pool and the files of uploads under way (`upload_files`):
    /// past that, `accept` fails and nobody is served.
    pub fn fitted(
        config: &ConnectionLimits,
        database_connections: u32,
        upload_files: usize,
    ) -> Self {
        let mut max_connections = config.max_connections;
        if let Some(open_files) = open_files_limit() {
            // A SQLite connection holds the database and its write-ahead log open.
            let database_files = 2 * database_connections as usize;
            let room = open_files
                .saturating_sub(PROBE_RESERVE + OTHER_FILES + database_files + upload_files)
                .max(1);
            if room < max_connections {
                tracing::warn!(
                    configured = max_connections,
                    lowered_to = room,
                    open_files,
                    "FALGATE_MAX_CONNECTIONS does not fit the open-files limit (ulimit -n); \
                     the cap is lowered"
                );
                max_connections = room;
            }
        }
        Self {
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            max_connections,
        }
    }
}

/// The soft limit on open files, where the platform tells it (Linux).
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?;
    // "unlimited" does not parse, and needs no fitting.
    line.split_whitespace().next()?.parse().ok()
}

/// Serves `router` on `listener` until `stopping` turns true, then lets every connection finish
/// the request it carries and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut stopping: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        reserve: Arc::new(Semaphore::new(PROBE_RESERVE)),
        limits,
        epoch: Instant::now(),
        open: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        at_cap: AtomicBool::new(false),
    });
    // Every connection task holds a receiver; the sender sees them all gone when the last ends.
    let (all_closed, connection_alive) = watch::channel(());
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF.0;
                stream
            }
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                // Retrying at once would spin on the same error, and returning would take the
                // service down for what is usually a passing shortage.
                tracing::error!(
                    error = %err,
                    retry_in_ms = backoff.as_millis() as u64,
                    "cannot accept connections"
                );
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stopping.wait_for(|stop| *stop) => break,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        let Some(admission) = shared.admit() else {
            tracing::debug!("connection closed on arrival: the cap and the probe reserve are full");
            drop(stream);
            continue;
        };
        tokio::spawn(serve_connection(
            shared.clone(),
            stream,
            admission,
            router.clone(),
            stopping.clone(),
            connection_alive.clone(),
        ));
    }
    drop(connection_alive);
    drop(listener);
    all_closed.closed().await;
    Ok(())
}

/// Errors of one connection that died in the backlog, not of the listener.
fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// What the accept loop and the connections share.
struct Shared {
    limits: Limits,
    /// The origin of every connection's timestamps, so that they compare across connections.
    epoch: Instant,
    /// One permit per connection under the cap.
    slots: Arc<Semaphore>,
    /// One permit per probe-only connection beyond the cap.
    reserve: Arc<Semaphore>,
    /// The connections under the cap, the candidates for making room.
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Whether the last newcomer found the cap reached, so that it is logged once per episode.
    at_cap: AtomicBool,
}

enum Admission {
    /// Under the cap: the whole API, kept alive between requests.
    Regular(OwnedSemaphorePermit),
    /// Beyond the cap: the health probes only, one request.
    ProbesOnly(OwnedSemaphorePermit),
}

impl Shared {
    fn admit(&self) -> Option<Admission> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            if self.at_cap.swap(false, Ordering::Relaxed) {
                tracing::info!("below the connection cap again");
            }
            return Some(Admission::Regular(slot));
        }
        if !self.at_cap.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                cap = self.limits.max_connections,
                "connection cap reached: idle connections are closed to make room"
            );
        }
        if let Some(slot) = self.take_slot_of_longest_idle() {
            return Some(Admission::Regular(slot));
        }
        self.reserve
            .clone()
            .try_acquire_owned()
            .ok()
            .map(Admission::ProbesOnly)
    }

    /// Tells the connection that has waited longest without a request in flight to close, and
    /// hands its slot over at once, so that the cap holds without waiting for it to go.
    fn take_slot_of_longest_idle(&self) -> Option<OwnedSemaphorePermit> {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let victim = open
            .values()
            .filter(|conn| {
                conn.in_flight.load(Ordering::Acquire) == 0 && !conn.evicted.load(Ordering::Acquire)
            })
            .min_by_key(|conn| (conn.idle_since.load(Ordering::Acquire), conn.id))?;
        let slot = victim
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        victim.evicted.store(true, Ordering::Release);
        victim.wake.notify_one();
        tracing::debug!(
            connection = victim.id,
            "closing an idle connection to make room"
        );
        Some(slot)
    }
}

/// Removes a connection from the candidates when its task ends, however it ends.
struct Registration {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

/// Marks a timestamp as absent.
const NEVER: u64 = u64::MAX;

/// One connection's state, as its supervisor and the accept loop see it. Times are
/// microseconds since [`Shared::epoch`].
struct Conn {
    id: u64,
    epoch: Instant,
    /// Requests whose response has not been sent in full.
    in_flight: AtomicUsize,
    /// Since when nothing has been in flight.
    idle_since: AtomicU64,
    /// Since when the head of the next request has been arriving; [`NEVER`] while nothing has
    /// arrived. A new connection counts as arriving from the moment it is accepted.
    head_since: AtomicU64,
    /// Asked to close to make room.
    evicted: AtomicBool,
    /// Wakes the supervisor when any of the above changes.
    wake: Notify,
    /// Its place under the cap, until it is handed to a newcomer.
    slot: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Conn {
    fn new(id: u64, epoch: Instant, slot: Option<OwnedSemaphorePermit>) -> Self {
        let now = micros_since(epoch);
        Self {
            id,
            epoch,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now),
            head_since: AtomicU64::new(now),
            evicted: AtomicBool::new(false),
            wake: Notify::new(),
            slot: Mutex::new(slot),
        }
    }

    /// When the connection is to be closed if nothing changes; `None` while a request is in
    /// flight (handlers bound their own work).
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let at = |micros: u64| self.epoch + Duration::from_micros(micros);
        match self.head_since.load(Ordering::Acquire) {
            NEVER => Some(at(self.idle_since.load(Ordering::Acquire)) + limits.idle_timeout),
            head => Some(at(head) + limits.header_timeout),
        }
    }

    /// Bytes came in: if nothing is in flight, they start the head of a request.
    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self
                .head_since
                .compare_exchange(
                    NEVER,
                    micros_since(self.epoch),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            self.wake.notify_one();
        }
    }
}

fn micros_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(NEVER - 1)
}

/// A request between its head being read and its response being sent in full.
struct InFlight(Arc<Conn>);

impl InFlight {
    fn begin(conn: &Arc<Conn>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        conn.head_since.store(NEVER, Ordering::Release);
        Self(conn.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let conn = &self.0;
        if conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            conn.idle_since
                .store(micros_since(conn.epoch), Ordering::Release);
            conn.wake.notify_one();
        }
    }
}

/// A request body that fails once its client has sent nothing for as long as a connection may
/// idle: a request in flight is not timed by the connection, and a body that stops coming would
/// otherwise hold its connection (and an upload its slot) for good.
struct Unstalled {
    body: Incoming,
    silence: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl Unstalled {
    fn new(body: Incoming, silence: Duration) -> Self {
        Self {
            body,
            silence,
            deadline: Box::pin(tokio::time::sleep(silence)),
        }
    }
}

impl HttpBody for Unstalled {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = Instant::now() + this.silence;
                this.deadline.as_mut().reset(next);
                Poll::Ready(frame.map(|frame| frame.map_err(std::io::Error::other)))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the request body stalled: nothing came for {} s",
                        this.silence.as_secs()
                    ),
                )))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that keeps its request in flight until it is sent or dropped.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The socket, telling its connection when bytes arrive.
struct Metered {
    stream: TcpStream,
    conn: Arc<Conn>,
}

impl AsyncRead for Metered {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.conn.bytes_arrived();
        }
        polled
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The paths a probes-only connection may ask for.
fn is_probe(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz")
}

fn at_capacity() -> Response<Body> {
    let mut response = ApiError::ServiceUnavailable(
        "the server is at its connection limit and every connection is busy; retry shortly".into(),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Serves one connection and supervises it: closes it when a request head is slow, when it is
/// idle too long, or when it is asked to make room; lets its request finish on shutdown.
async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    admission: Admission,
    router: Router,
    mut stopping: watch::Receiver<bool>,
    _alive: watch::Receiver<()>,
) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let (conn, probes_only, _registration, _reserve) = match admission {
        Admission::Regular(slot) => {
            let conn = Arc::new(Conn::new(id, shared.epoch, Some(slot)));
            shared
                .open
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, conn.clone());
            let registration = Registration {
                shared: shared.clone(),
                id,
            };
            (conn, false, Some(registration), None)
        }
        Admission::ProbesOnly(permit) => (
            Arc::new(Conn::new(id, shared.epoch, None)),
            true,
            None,
            Some(permit),
        ),
    };
    let limits_idle = shared.limits.idle_timeout;
    let service = hyper::service::service_fn({
        let conn = conn.clone();
        move |request: Request<Incoming>| {
            let in_flight = InFlight::begin(&conn);
            let router = router.clone();
            let stall_after = limits_idle;
            async move {
                let request = request.map(|body| Body::new(Unstalled::new(body, stall_after)));
                let response = if probes_only && !is_probe(request.uri().path()) {
                    at_capacity()
                } else {
                    match router.oneshot(request).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    }
                };
                Ok::<_, Infallible>(response.map(|body| Tracked {
                    body,
                    _in_flight: in_flight,
                }))
            }
        }
    });
    let io = TokioIo::new(Metered {
        stream,
        conn: conn.clone(),
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The supervisor keeps the header deadline; hyper's own would also cut idle connections.
    builder
        .header_read_timeout(None)
        .keep_alive(!probes_only)
        // A request head larger than this is refused (431): hyper's default lets each of a
        // thousand unauthenticated connections hold about 400 KiB.
        .max_buf_size(MAX_HEAD_BYTES);
    let mut connection = pin!(builder.serve_connection(io, service));
    let limits = &shared.limits;
    let mut closing = false;
    loop {
        if conn.evicted.load(Ordering::Acquire) && !closing {
            if conn.in_flight.load(Ordering::Acquire) == 0 {
                break;
            }
            // A request started after it was chosen: let that one finish.
            connection.as_mut().graceful_shutdown();
            closing = true;
        }
        let deadline = conn.deadline(limits);
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(err) = served {
                    tracing::debug!(connection = id, error = %err, "connection ended with an error");
                }
                break;
            }
            () = conn.wake.notified() => {}
            () = sleep_until(deadline) => {
                // The request, the head or the idle wait may have moved on since.
                if conn.deadline(limits).is_some_and(|due| due <= Instant::now()) {
                    tracing::debug!(connection = id, "connection closed: too slow or idle too long");
                    break;
                }
            }
            _ = stopping.wait_for(|stop| *stop), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
