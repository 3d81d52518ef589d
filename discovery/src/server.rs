//! Serving the router over plain HTTP or HTTPS with client certificates, with graceful
//! shutdown and a periodic sweep of expired entries.

use std::{future::Future, sync::Arc, time::Duration};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::api::AppState;

/// How long open connections get to finish after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);
/// Handshakes in progress at once (TLS); more connections wait in the kernel backlog.
const MAX_HANDSHAKES: usize = 256;

/// Serve `router` on `listener` until `shutdown` resolves. With `tls`, every connection must
/// complete a TLS handshake (and present a client certificate if the acceptor requires one).
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    router: Router,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let sweeper = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let n = state.expire();
                if n > 0 {
                    tracing::info!(expired = n, "entries expired");
                }
            }
        })
    };
    let res = match tls {
        None => {
            let state2 = state.clone();
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    shutdown.await;
                    state2.set_shutting_down();
                })
                .await
        }
        Some(acceptor) => serve_tls(listener, state, router, acceptor, shutdown).await,
    };
    sweeper.abort();
    res
}

async fn serve_tls(
    listener: TcpListener,
    state: Arc<AppState>,
    router: Router,
    acceptor: TlsAcceptor,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            },
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let acceptor = acceptor.clone();
        let svc = hyper_util::service::TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        conns.spawn(async move {
            let handshake =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
            drop(permit);
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::warn!(%remote, error = %e, "refused TLS connection");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        });
    }
    state.set_shutting_down();
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {DRAIN:?}, closing them");
    }
    conns.shutdown().await;
    Ok(())
}
