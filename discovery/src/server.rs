//! Serving the router over plain HTTP or HTTPS with client certificates: one accept loop for
//! both, bounded so that idle or slow clients cannot starve the service, with graceful
//! shutdown and a periodic sweep of expired entries.
//!
//! The bounds, all in [`ServerConfig`]:
//!
//! - **A connection limit.** At the limit, a new connection closes the open connection that
//!   has been idle (no request in progress, nothing read or written) for the longest, and
//!   takes its place; only when every connection has a request in progress does the server
//!   stop accepting, and new connections wait in the kernel's backlog. Nodes and health probes
//!   send their request as soon as they connect, so a flood of idle connections delays them
//!   by microseconds rather than by a timeout: waiting for timeouts to free slots would queue
//!   them behind the attacker's connections, for as long as the attacker keeps reconnecting.
//! - **A header timeout**: a request head must arrive in full within it (hyper's
//!   `header_read_timeout`). Hyper also applies it to the wait for the next request on a
//!   keep-alive connection.
//! - **An idle timeout**: a connection with no request being handled, on which nothing was
//!   read or written for that long, is closed: keep-alive connections between requests,
//!   clients that stop reading an answer, and TLS handshakes that stall. Between requests on a
//!   keep-alive connection, the smaller of the header and idle timeouts applies.
//! - **A request timeout**, from the request head to the answer (reading the body included):
//!   past it the request is answered `408` and the connection closed.
//! - **A TLS handshake timeout.**
//! - Request heads larger than 64 KiB are refused (hyper answers `431`), which bounds the
//!   memory of a connection.
//!
//! `accept` errors (for instance too many open files) back off, from 10 ms doubling up to 1 s,
//! instead of retrying at once. Every refused or closed connection is counted in
//! [`Stats`], and logged at a bounded rate.

use std::{
    cmp::Reverse,
    collections::HashMap,
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    Router,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::{GracefulShutdown, Watcher},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError},
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::{
    api::{ApiError, AppState},
    stats::{Cause, SUMMARY_INTERVAL, Stats},
};

/// Default of [`ServerConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default of [`ServerConfig::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`ServerConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default of [`ServerConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ServerConfig::tls_handshake_timeout`].
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ServerConfig::drain_timeout`].
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The shortest and longest timeouts [`ServerConfig::validate`] accepts.
pub const TIMEOUT_RANGE: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_secs(3600));

/// Largest request head (and read buffer) of a connection.
const MAX_BUF: usize = 64 * 1024;
/// First and longest pause after a failed `accept`.
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
/// How often expired registrations are dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// How connections are bounded; see the module docs. The defaults are the `DEFAULT_*`
/// constants of this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Connections open at once at most, TLS handshakes included.
    pub max_connections: usize,
    /// A request head must arrive in full within this, after the connection is ready (TLS
    /// handshake done) or the previous answer was sent.
    pub header_timeout: Duration,
    /// A connection with no request in progress and no byte read or written for this long
    /// is closed.
    pub idle_timeout: Duration,
    /// A request must be read and answered within this, or it is answered 408.
    pub request_timeout: Duration,
    /// A TLS handshake must complete within this.
    pub tls_handshake_timeout: Duration,
    /// After the shutdown signal, open requests get this long to finish.
    pub drain_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            tls_handshake_timeout: DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

impl ServerConfig {
    /// Check the settings: a positive connection limit, and timeouts within
    /// [`TIMEOUT_RANGE`].
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("the connection limit must be positive".into());
        }
        let (min, max) = TIMEOUT_RANGE;
        for (name, d) in [
            ("header timeout", self.header_timeout),
            ("idle timeout", self.idle_timeout),
            ("request timeout", self.request_timeout),
            ("TLS handshake timeout", self.tls_handshake_timeout),
            ("drain timeout", self.drain_timeout),
        ] {
            if d < min || d > max {
                return Err(format!("the {name} must be within {min:?}..={max:?}"));
            }
        }
        Ok(())
    }
}

/// Serve `router` on `listener` until `shutdown` resolves, bounded by `config`. With `tls`,
/// every connection must complete a TLS handshake (and present a client certificate if the
/// acceptor requires one). Fails at once if `config` is invalid.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    router: Router,
    tls: Option<TlsAcceptor>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    config
        .validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    state.stats().set_connection_limit(config.max_connections);
    let _sweeper = AbortOnDrop(tokio::spawn({
        let state = state.clone();
        async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            loop {
                tick.tick().await;
                let n = state.expire();
                if n > 0 {
                    tracing::info!(expired = n, "entries expired");
                }
            }
        }
    }));
    let _summaries = AbortOnDrop(tokio::spawn({
        let state = state.clone();
        async move {
            let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                state.stats().summarize();
            }
        }
    }));
    let ctx = Arc::new(Ctx {
        table: Table {
            slots: Arc::new(Semaphore::new(config.max_connections)),
            conns: Mutex::new(HashMap::new()),
            became_idle: Notify::new(),
        },
        state,
        router,
        tls,
        config,
    });
    accept_loop(listener, ctx, shutdown).await
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What every connection task shares.
struct Ctx {
    table: Table,
    state: Arc<AppState>,
    router: Router,
    tls: Option<TlsAcceptor>,
    config: ServerConfig,
}

impl Ctx {
    fn stats(&self) -> &Stats {
        self.state.stats()
    }
}

/// The open connections, for the connection limit.
struct Table {
    slots: Arc<Semaphore>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Notified when a request ends: at the limit, its connection may now be closed.
    became_idle: Notify,
}

impl Table {
    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Close the connection idle for the longest, if some connection is idle; returns
    /// whether one was.
    fn evict_most_idle(&self, stats: &Stats, limit: usize) -> bool {
        // Idle for the longest; the oldest of equals.
        let victim = self
            .conns()
            .iter()
            .filter(|(_, c)| !c.closing.load(Ordering::Acquire) && !c.busy())
            .map(|(id, c)| (c.idle_for(), Reverse(*id), c.clone()))
            .max_by_key(|(idle, id, _)| (*idle, *id));
        let Some((idle, _, conn)) = victim else {
            return false;
        };
        conn.closing.store(true, Ordering::Release);
        conn.close.notify_one();
        stats.record(
            Cause::Evicted,
            format_args!(
                "{} open (the limit): closed {}, idle for {idle:?}",
                limit, conn.remote
            ),
        );
        true
    }
}

/// One connection's activity, shared by its task, its I/O and the table.
///
/// A connection is busy while a request is handled, from its head to the answer's head (the
/// request timeout bounds that), and idle otherwise: then it is closed when nothing was read
/// or written for the idle timeout, or to make room at the connection limit. The routes
/// answer with bodies in one piece, which hyper takes at once: a client that does not read
/// its answer is idle while hyper waits to send it.
struct Conn {
    remote: SocketAddr,
    opened: Instant,
    /// Time of the last byte read or written, or of the last request's end, in microseconds
    /// since `opened`.
    last_us: AtomicU64,
    handling: AtomicUsize,
    /// Notified when a request ends: the watchdog recomputes its deadline.
    changed: Notify,
    closing: AtomicBool,
    close: Notify,
}

impl Conn {
    fn new(remote: SocketAddr) -> Self {
        Self {
            remote,
            opened: Instant::now(),
            last_us: AtomicU64::new(0),
            handling: AtomicUsize::new(0),
            changed: Notify::new(),
            closing: AtomicBool::new(false),
            close: Notify::new(),
        }
    }

    fn elapsed_us(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_us.fetch_max(self.elapsed_us(), Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        Duration::from_micros(
            self.elapsed_us()
                .saturating_sub(self.last_us.load(Ordering::Relaxed)),
        )
    }

    fn busy(&self) -> bool {
        self.handling.load(Ordering::Acquire) > 0
    }
}

/// A connection's place in the table: frees it when dropped.
struct Slot {
    id: u64,
    ctx: Arc<Ctx>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.ctx.table.conns().remove(&self.id);
        self.ctx.stats().closed();
    }
}

/// A request being handled on a connection: the connection is busy meanwhile.
struct Handling {
    conn: Arc<Conn>,
    ctx: Arc<Ctx>,
}

impl Handling {
    fn start(conn: Arc<Conn>, ctx: Arc<Ctx>) -> Self {
        conn.handling.fetch_add(1, Ordering::AcqRel);
        ctx.stats().request_started();
        Self { conn, ctx }
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        let conn = &self.conn;
        conn.touch();
        self.ctx.stats().request_ended();
        if conn.handling.fetch_sub(1, Ordering::AcqRel) == 1 {
            conn.changed.notify_one();
            self.ctx.table.became_idle.notify_one();
        }
    }
}

/// A stream that records when bytes move, for the idle timeout.
struct Tracked<T> {
    io: T,
    conn: Arc<Conn>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.conn.touch();
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.conn.touch();
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            this.conn.touch();
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Errors of `accept` about one connection that its peer gave up: nothing to back off from.
fn peer_gave_up(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut tasks = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut next_id: u64 = 0;
    let limit = ctx.config.max_connections;
    tokio::pin!(shutdown);
    'accept: loop {
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = ACCEPT_BACKOFF.0;
                    a
                }
                Err(e) if peer_gave_up(&e) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
                Err(e) => {
                    ctx.stats().record(
                        Cause::AcceptError,
                        format_args!("{e} (retrying in {backoff:?}, doubling up to {:?})", ACCEPT_BACKOFF.1),
                    );
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                    continue;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        // A place for it: free, or made by closing the connection idle for the longest, or
        // (every connection busy) the first to end or become idle.
        let permit = loop {
            match ctx.table.slots.clone().try_acquire_owned() {
                Ok(p) => break p,
                Err(TryAcquireError::Closed) => break 'accept,
                Err(TryAcquireError::NoPermits) => {}
            }
            let evicted = ctx.table.evict_most_idle(ctx.stats(), limit);
            tokio::select! {
                () = &mut shutdown => break 'accept,
                p = ctx.table.slots.clone().acquire_owned() => match p {
                    Ok(p) => break p,
                    Err(_) => break 'accept,
                },
                () = ctx.table.became_idle.notified(), if !evicted => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        };
        let _ = tcp.set_nodelay(true);
        let conn = Arc::new(Conn::new(remote));
        let id = next_id;
        next_id = next_id.wrapping_add(1);
        ctx.table.conns().insert(id, conn.clone());
        ctx.stats().opened();
        let slot = Slot {
            id,
            ctx: ctx.clone(),
            _permit: permit,
        };
        tasks.spawn(connection(tcp, conn, slot, graceful.watcher()));
    }
    ctx.state.set_shutting_down();
    drop(listener);
    let drain = ctx.config.drain_timeout;
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {drain:?}, closing them");
    }
    tasks.shutdown().await;
    Ok(())
}

/// One connection, from its TLS handshake (if any) to its end.
async fn connection(tcp: TcpStream, conn: Arc<Conn>, slot: Slot, watcher: Watcher) {
    let ctx = slot.ctx.clone();
    let io = Tracked {
        io: tcp,
        conn: conn.clone(),
    };
    let remote = conn.remote;
    let served = async {
        let Some(acceptor) = &ctx.tls else {
            return serve_http(io, &conn, &ctx, watcher).await;
        };
        let timeout = ctx.config.tls_handshake_timeout;
        match tokio::time::timeout(timeout, acceptor.accept(io)).await {
            Ok(Ok(tls)) => serve_http(tls, &conn, &ctx, watcher).await,
            Ok(Err(e)) => ctx
                .stats()
                .record(Cause::TlsRefused, format_args!("{remote}: {e}")),
            Err(_) => ctx.stats().record(
                Cause::TlsHandshakeTimeout,
                format_args!("{remote}: no handshake within {timeout:?}"),
            ),
        }
    };
    tokio::select! {
        () = served => {}
        cause = watchdog(&conn, ctx.config.idle_timeout) => {
            // Evictions are recorded by the table.
            if cause == Cause::IdleTimeout {
                ctx.stats().record(
                    cause,
                    format_args!("{remote}: nothing read or written for {:?}", conn.idle_for()),
                );
            }
        }
    }
    drop(slot);
}

/// Resolves when the connection must be closed: idle for `idle`, or evicted.
async fn watchdog(conn: &Conn, idle: Duration) -> Cause {
    loop {
        let wait = if conn.busy() {
            // The request timeout bounds this; the request's end wakes us up.
            idle
        } else {
            let left = idle.saturating_sub(conn.idle_for());
            if left.is_zero() {
                return Cause::IdleTimeout;
            }
            left
        };
        tokio::select! {
            () = conn.close.notified() => return Cause::Evicted,
            () = conn.changed.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// HTTP/1.1 on a ready connection (plain, or after the TLS handshake).
async fn serve_http<I>(io: I, conn: &Arc<Conn>, ctx: &Arc<Ctx>, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = {
        let (conn, ctx) = (conn.clone(), ctx.clone());
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let handling = Handling::start(conn.clone(), ctx.clone());
            let answer = ctx.router.clone().oneshot(req);
            let ctx = ctx.clone();
            async move {
                let timeout = ctx.config.request_timeout;
                let res = match tokio::time::timeout(timeout, answer).await {
                    Ok(Ok(res)) => res,
                    Ok(Err(never)) => match never {},
                    Err(_) => {
                        ctx.stats().record(
                            Cause::RequestTimeout,
                            format_args!(
                                "{}: not received and answered within {timeout:?}",
                                handling.conn.remote
                            ),
                        );
                        timed_out(timeout)
                    }
                };
                drop(handling);
                Ok::<_, Infallible>(res)
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.config.header_timeout)
        .max_buf_size(MAX_BUF);
    let http = builder.serve_connection(TokioIo::new(io), service);
    let remote = conn.remote;
    match watcher.watch(http).await {
        Ok(()) => {}
        Err(e) if e.is_timeout() => ctx.stats().record(
            Cause::HeaderTimeout,
            format_args!(
                "{remote}: no complete request head within {:?}",
                ctx.config.header_timeout
            ),
        ),
        Err(e) => ctx
            .stats()
            .record(Cause::HttpError, format_args!("{remote}: {e}")),
    }
}

/// The answer to a request not answered in time; the connection closes after it.
fn timed_out(timeout: Duration) -> Response {
    let mut res = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        format!("the request was not received and answered within {timeout:?}"),
    )
    .into_response();
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}
