//! `socketioxide-mesh-discovery`: the seed discovery service binary.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use socketioxide_mesh::TlsConfig;
use socketioxide_mesh_discovery::{
    api,
    registry::{Limits, Registry},
    server,
};

#[derive(Parser)]
#[command(
    version,
    about = "Seed discovery for socketioxide-mesh: hands out live seeds per cluster"
)]
struct Cli {
    /// Listen address. Default: 0.0.0.0:$PORT (PORT defaults to 8000).
    #[arg(long, env = "DISCOVERY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Port when --listen is not given.
    #[arg(long, env = "PORT", default_value_t = 8000)]
    port: u16,
    /// Entries expire this long after their last renewal (milliseconds).
    #[arg(long, env = "DISCOVERY_TTL_MS", default_value_t = 30_000)]
    ttl_ms: u64,
    /// Clusters at most.
    #[arg(long, env = "DISCOVERY_MAX_CLUSTERS", default_value_t = 1024)]
    max_clusters: usize,
    /// Nodes at most per cluster.
    #[arg(long, env = "DISCOVERY_MAX_NODES", default_value_t = 1024)]
    max_nodes: usize,
    /// Seeds handed out per registration.
    #[arg(long, env = "DISCOVERY_SEEDS_PER_REPLY", default_value_t = 3)]
    seeds_per_reply: usize,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "DISCOVERY_MAX_BODY", default_value_t = 16 * 1024)]
    max_body: usize,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `debug`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Serve HTTPS with this certificate chain (PEM). Needs --tls-key and --tls-client-ca.
    #[arg(long, env = "DISCOVERY_TLS_CERT", requires_all = ["tls_key", "tls_client_ca"])]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "DISCOVERY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): the mesh's cluster CA.
    #[arg(long, env = "DISCOVERY_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log_level).context("--log-level")?,
        )
        .with_writer(std::io::stderr)
        .init();
    anyhow::ensure!(cli.ttl_ms >= 100, "--ttl-ms must be at least 100");
    anyhow::ensure!(
        cli.max_clusters > 0 && cli.max_nodes > 0,
        "limits must be positive"
    );
    anyhow::ensure!(
        cli.seeds_per_reply > 0,
        "--seeds-per-reply must be positive"
    );
    anyhow::ensure!(
        (256..=1 << 24).contains(&cli.max_body),
        "--max-body must be within 256 B..16 MiB"
    );

    let tls = match (&cli.tls_cert, &cli.tls_key, &cli.tls_client_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            let tls = TlsConfig::from_pem_files(ca, cert, key).context("discovery TLS material")?;
            let config = tls
                .rustls_server_config(vec![b"http/1.1".to_vec()])
                .context("discovery TLS configuration")?;
            Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
        }
        _ => None,
    };
    let listen = cli
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], cli.port)));
    let limits = Limits {
        max_clusters: cli.max_clusters,
        max_nodes_per_cluster: cli.max_nodes,
        seeds_per_reply: cli.seeds_per_reply,
    };
    let state = api::AppState::new(Registry::new(Duration::from_millis(cli.ttl_ms), limits));
    let router = api::router(state.clone(), cli.max_body);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    let addr = listener.local_addr()?;
    let shutdown = shutdown_signal();
    println!(
        "{}",
        serde_json::json!({"event": "ready", "addr": addr.to_string(), "tls": tls.is_some()})
    );
    tracing::info!(%addr, tls = tls.is_some(), ttl_ms = cli.ttl_ms, "discovery service listening");
    server::serve(listener, state, router, tls, shutdown).await?;
    tracing::info!("discovery service stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is called, not when
/// the future is first polled: call it before announcing readiness, or a signal sent right
/// after would kill the process the default way.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = ctrl_c.await;
    }
}
