//! Counters of connection events, and their rate-limited logging.
//!
//! Events caused by remote peers (a refused TLS handshake, an idle connection closed, ...) are
//! counted exactly, but logged sparingly, so that nobody can flood the logs by opening
//! connections: the first occurrence of each [`Cause`] is logged with its reason, later ones
//! only as counts in one summary line per interval ([`Stats::summarize`], every
//! [`SUMMARY_INTERVAL`] while serving). A cause that stays quiet for a whole interval is
//! logged with its reason again the next time it occurs.

use std::{
    fmt::{Display, Write as _},
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

/// How often the server logs a summary of the events not logged one by one.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Why a connection was refused or closed by the server (or could not be accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Cause {
    /// `accept` failed (for instance: too many open files); the server backed off.
    AcceptError,
    /// The TLS handshake failed (no client certificate, a foreign CA, not TLS at all, ...).
    TlsRefused,
    /// The TLS handshake did not complete within its timeout.
    TlsHandshakeTimeout,
    /// A request head did not arrive in full within the header timeout.
    HeaderTimeout,
    /// Nothing was read or written for the idle timeout, with no request being handled.
    IdleTimeout,
    /// A request was not received and answered within the request timeout: answered 408.
    RequestTimeout,
    /// Closed to make room for a new connection at the connection limit (the connection
    /// idle for the longest is closed).
    Evicted,
    /// The connection ended with an HTTP error: malformed request, closed mid-request, ...
    HttpError,
}

impl Cause {
    /// Every cause, in the order of [`Stats::counts`].
    pub const ALL: [Cause; 8] = [
        Cause::AcceptError,
        Cause::TlsRefused,
        Cause::TlsHandshakeTimeout,
        Cause::HeaderTimeout,
        Cause::IdleTimeout,
        Cause::RequestTimeout,
        Cause::Evicted,
        Cause::HttpError,
    ];

    /// A short name, as used in logs and in `/v1/stats`.
    pub fn name(self) -> &'static str {
        match self {
            Cause::AcceptError => "accept_error",
            Cause::TlsRefused => "tls_refused",
            Cause::TlsHandshakeTimeout => "tls_handshake_timeout",
            Cause::HeaderTimeout => "header_timeout",
            Cause::IdleTimeout => "idle_timeout",
            Cause::RequestTimeout => "request_timeout",
            Cause::Evicted => "evicted_at_connection_limit",
            Cause::HttpError => "http_error",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Cause::AcceptError => "accept error: backing off",
            Cause::TlsRefused => "refused TLS connection",
            Cause::TlsHandshakeTimeout => "TLS handshake timed out",
            Cause::HeaderTimeout => "closed a connection: no complete request head in time",
            Cause::IdleTimeout => "closed an idle connection",
            Cause::RequestTimeout => "request timed out: answered 408",
            Cause::Evicted => {
                "connection limit reached: closed the connection idle for the longest"
            }
            Cause::HttpError => "connection ended with an HTTP error",
        }
    }

    /// Worth a warning (a misconfigured peer, an attack, or a server at its limits), or only
    /// a debug line (what browsers and health probes do as well).
    fn warns(self) -> bool {
        !matches!(
            self,
            Cause::HeaderTimeout | Cause::IdleTimeout | Cause::HttpError
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Default)]
struct Counter {
    total: AtomicU64,
    /// Occurrences not logged one by one since the last summary.
    unlogged: AtomicU64,
    /// Occurred since the last summary.
    seen: AtomicBool,
    /// The next occurrence is logged with its reason.
    armed: AtomicBool,
}

/// Exact counters of connection events, and the open connections. See the module docs.
pub struct Stats {
    counters: [Counter; Cause::ALL.len()],
    open: AtomicUsize,
    requests: AtomicUsize,
    limit: AtomicUsize,
}

impl Default for Stats {
    fn default() -> Self {
        let counters: [Counter; Cause::ALL.len()] = Default::default();
        for c in &counters {
            c.armed.store(true, Ordering::Relaxed);
        }
        Self {
            counters,
            open: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
            limit: AtomicUsize::new(0),
        }
    }
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats")
            .field("open", &self.open_connections())
            .field("requests", &self.requests_in_progress())
            .field("counts", &self.counts())
            .finish()
    }
}

impl Stats {
    /// Count one occurrence of `cause`; logged with `reason` if it is the first in a while,
    /// else left to the next [`summarize`](Self::summarize).
    pub fn record(&self, cause: Cause, reason: impl Display) {
        let c = &self.counters[cause.index()];
        c.total.fetch_add(1, Ordering::Relaxed);
        c.seen.store(true, Ordering::Relaxed);
        if c.armed.swap(false, Ordering::AcqRel) {
            let then = "(further ones are counted in a summary)";
            if cause.warns() {
                tracing::warn!(cause = cause.name(), %reason, "{} {then}", cause.describe());
            } else {
                tracing::debug!(cause = cause.name(), %reason, "{} {then}", cause.describe());
            }
        } else {
            c.unlogged.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Log one line with the occurrences not logged since the last call, if any, and re-arm
    /// the causes that did not occur since then. Returns the summary (`cause=count`, space
    /// separated), empty when there was nothing to log.
    pub fn summarize(&self) -> String {
        let mut line = String::new();
        let mut warns = false;
        for cause in Cause::ALL {
            let c = &self.counters[cause.index()];
            if !c.seen.swap(false, Ordering::AcqRel) {
                c.armed.store(true, Ordering::Release);
            }
            let n = c.unlogged.swap(0, Ordering::AcqRel);
            if n > 0 {
                warns |= cause.warns();
                let _ = write!(
                    line,
                    "{}{}={n}",
                    if line.is_empty() { "" } else { " " },
                    cause.name()
                );
            }
        }
        if !line.is_empty() {
            if warns {
                tracing::warn!(counts = %line, "connection events since the last summary");
            } else {
                tracing::debug!(counts = %line, "connection events since the last summary");
            }
        }
        line
    }

    /// How many times `cause` occurred since the start.
    pub fn count(&self, cause: Cause) -> u64 {
        self.counters[cause.index()].total.load(Ordering::Relaxed)
    }

    /// Every cause with its count since the start.
    pub fn counts(&self) -> Vec<(Cause, u64)> {
        Cause::ALL.iter().map(|&c| (c, self.count(c))).collect()
    }

    /// Connections open now (including those in a TLS handshake).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Requests being read or answered now.
    pub fn requests_in_progress(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// The connection limit of the server, 0 before it starts.
    pub fn connection_limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    pub(crate) fn set_connection_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub(crate) fn opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn request_ended(&self) {
        self.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Captures formatted log lines.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn take(&self) -> Vec<String> {
            let bytes = std::mem::take(&mut *self.0.lock().unwrap());
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(String::from)
                .collect()
        }
    }

    fn with_logs(f: impl FnOnce(&Lines)) {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || f(&lines));
    }

    #[test]
    fn a_flood_logs_the_first_reason_then_summaries() {
        with_logs(|lines| {
            let stats = Stats::default();
            for i in 0..1000 {
                stats.record(Cause::TlsRefused, format!("peer {i}: no certificate"));
            }
            stats.record(Cause::AcceptError, "Too many open files");
            let logged = lines.take();
            assert_eq!(logged.len(), 2, "{logged:#?}");
            assert!(
                logged[0].contains("WARN")
                    && logged[0].contains("refused TLS connection")
                    && logged[0].contains("peer 0: no certificate"),
                "{logged:#?}"
            );
            assert!(logged[1].contains("Too many open files"), "{logged:#?}");

            // One summary line with the counts not logged.
            assert_eq!(stats.summarize(), "tls_refused=999");
            let logged = lines.take();
            assert_eq!(logged.len(), 1, "{logged:#?}");
            assert!(logged[0].contains("WARN") && logged[0].contains("tls_refused=999"));
            assert_eq!(stats.count(Cause::TlsRefused), 1000);
            assert_eq!(stats.count(Cause::AcceptError), 1);

            // Still going on: counted, not logged one by one (the cause occurred during the
            // last interval, so it is not re-armed).
            stats.record(Cause::TlsRefused, "again");
            assert!(lines.take().is_empty());
            assert_eq!(stats.summarize(), "tls_refused=1");
            lines.take();
            // A quiet interval re-arms it: the next occurrence comes with its reason.
            assert_eq!(stats.summarize(), "");
            assert!(lines.take().is_empty(), "nothing to summarize, no line");
            stats.record(Cause::TlsRefused, "after a pause");
            let logged = lines.take();
            assert_eq!(logged.len(), 1);
            assert!(logged[0].contains("after a pause"), "{logged:#?}");
            assert_eq!(stats.count(Cause::TlsRefused), 1002);
        });
    }

    #[test]
    fn ordinary_closes_are_debug_only() {
        with_logs(|lines| {
            let stats = Stats::default();
            stats.record(Cause::IdleTimeout, "idle 5 s");
            stats.record(Cause::IdleTimeout, "idle 5 s");
            assert_eq!(stats.summarize(), "idle_timeout=1");
            let logged = lines.take();
            assert_eq!(logged.len(), 2);
            assert!(logged.iter().all(|l| l.contains("DEBUG")), "{logged:#?}");
        });
    }
}
