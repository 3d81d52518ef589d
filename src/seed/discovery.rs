//! The client of the seed discovery service (`socketioxide-mesh-discovery`).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, Uri, header};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::{SeedContext, SeedError, SeedSource};
use crate::{backoff::Backoff, tls::TlsConfig};

/// Largest answer read from the service.
const MAX_ANSWER: usize = 64 * 1024;

#[derive(Debug, Clone)]
struct Endpoint {
    https: bool,
    host: String,
    port: u16,
    prefix: String,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.prefix)
    }
}

fn parse_endpoint(url: &str) -> Result<Endpoint, SeedError> {
    let bad = |why: &str| SeedError::new(format!("invalid discovery URL {url:?}: {why}"));
    let uri: Uri = url.trim().parse().map_err(|_| bad("not a URL"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad("the scheme must be http or https")),
    };
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let prefix = uri.path().trim_end_matches('/').to_string();
    Ok(Endpoint {
        https,
        host,
        port,
        prefix,
    })
}

#[derive(Default)]
struct State {
    seeds: Vec<SocketAddr>,
    next_at: Option<Instant>,
    failures: u32,
    /// The service's TTL, once known: retries never wait longer than a third of it, so a
    /// restarted service has every node back within one TTL.
    ttl: Option<Duration>,
}

/// Seeds from the discovery service: registers this node, renews it at a third of the
/// service's TTL, and hands the seeds it gets to gossip. When the service is unreachable it
/// backs off (exponentially, with jitter) and keeps answering with the last seeds it got:
/// membership never depends on the service.
///
/// With several URLs (replicas), the node registers with every one and merges their seeds, so
/// replicas need not share anything.
///
/// ```no_run
/// use socketioxide_mesh::{MeshConfig, TlsConfig, seed::DiscoverySeeds};
/// # fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let tls = TlsConfig::from_dir("/etc/mesh-tls")?;
/// let seeds = DiscoverySeeds::new(["https://discovery.mesh.svc:8000"])?.with_tls(&tls)?;
/// let config = MeshConfig::new(tls).with_seeds(seeds);
/// # let _ = config; Ok(()) }
/// ```
pub struct DiscoverySeeds {
    endpoints: Vec<Endpoint>,
    tls: Option<tokio_rustls::TlsConnector>,
    timeout: Duration,
    backoff: Backoff,
    /// Never held across an await.
    state: std::sync::Mutex<State>,
}

impl std::fmt::Debug for DiscoverySeeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.endpoints.iter().map(ToString::to_string).collect();
        f.debug_struct("DiscoverySeeds")
            .field("urls", &urls)
            .finish_non_exhaustive()
    }
}

impl DiscoverySeeds {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The service's URLs (`http://` or `https://`, optionally with a path prefix).
    pub fn new<S: AsRef<str>>(urls: impl IntoIterator<Item = S>) -> Result<Self, SeedError> {
        let endpoints = urls
            .into_iter()
            .map(|u| parse_endpoint(u.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(SeedError::new("no discovery URL given"));
        }
        Ok(Self {
            endpoints,
            tls: None,
            timeout: Duration::from_secs(3),
            backoff: Backoff {
                min: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
            state: std::sync::Mutex::new(State::default()),
        })
    }

    /// Use the node's mutual TLS material for `https://` URLs: trust the cluster CA (the
    /// service's certificate must be issued by it, for the URL's host) and present the node's
    /// certificate (the service may require it).
    pub fn with_tls(mut self, tls: &TlsConfig) -> Result<Self, SeedError> {
        let config = tls
            .rustls_client_config(vec![b"http/1.1".to_vec()])
            .map_err(|e| SeedError::new(e.to_string()))?;
        self.tls = Some(tokio_rustls::TlsConnector::from(Arc::new(config)));
        Ok(self)
    }

    /// Bound on each request to the service. Default: 3 s.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether some URL needs TLS.
    pub fn needs_tls(&self) -> bool {
        self.endpoints.iter().any(|e| e.https)
    }

    async fn call(
        &self,
        ep: &Endpoint,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), String> {
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        if ep.https {
            let connector = self
                .tls
                .as_ref()
                .ok_or("an https URL needs TLS material (DiscoverySeeds::with_tls)")?;
            let name = ServerName::try_from(ep.host.clone()).map_err(|e| e.to_string())?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            http_call(tls, ep, method, path, body).await
        } else {
            http_call(tcp, ep, method, path, body).await
        }
    }

    async fn register(
        &self,
        ep: &Endpoint,
        ctx: &SeedContext,
    ) -> Result<super::discovery_api::Registered, String> {
        let body = serde_json::to_vec(&super::discovery_api::Register {
            node_id: ctx.node_id.to_string(),
            addr: ctx.advertise_addr,
        })
        .map_err(|e| e.to_string())?;
        let path = format!("{}/v1/clusters/{}/nodes", ep.prefix, ctx.cluster_id);
        let (status, answer) =
            tokio::time::timeout(self.timeout, self.call(ep, Method::POST, &path, Some(body)))
                .await
                .map_err(|_| "timed out".to_string())??;
        if status != StatusCode::OK {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&answer)));
        }
        serde_json::from_slice(&answer).map_err(|e| format!("unexpected answer: {e}"))
    }
}

async fn http_call<S>(
    stream: S,
    ep: &Endpoint,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, format!("{}:{}", ep.host, ep.port));
    if body.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = res.status();
        let answer = Limited::new(res.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, answer))
    };
    // Drive the connection while the exchange runs; both end with this future.
    tokio::select! {
        res = exchange => res,
        res = conn => Err(match res {
            Ok(()) => "connection closed before the answer".to_string(),
            Err(e) => e.to_string(),
        }),
    }
}

#[async_trait::async_trait]
impl SeedSource for DiscoverySeeds {
    fn name(&self) -> &str {
        "discovery"
    }

    async fn seeds(&self, ctx: &SeedContext) -> Result<Vec<SocketAddr>, SeedError> {
        let now = Instant::now();
        {
            let state = self.state();
            if state.next_at.is_some_and(|t| now < t) {
                return Ok(state.seeds.clone());
            }
        }
        // No lock across the HTTP calls (two concurrent callers may both register: harmless).
        let mut seeds = Vec::new();
        let mut ttl: Option<Duration> = None;
        let mut errors = Vec::new();
        for ep in &self.endpoints {
            match self.register(ep, ctx).await {
                Ok(reg) => {
                    seeds.extend(reg.seeds);
                    let t = Duration::from_millis(reg.ttl_ms);
                    ttl = Some(ttl.map_or(t, |old| old.min(t)));
                }
                Err(e) => errors.push(format!("{ep}: {e}")),
            }
        }
        let mut state = self.state();
        match ttl {
            Some(ttl) => {
                if state.failures > 0 {
                    tracing::info!("discovery service reachable again: registered");
                }
                state.failures = 0;
                state.ttl = Some(ttl);
                seeds.sort();
                seeds.dedup();
                state.seeds = seeds;
                // Renew at a third of the TTL: two renewals may fail before expiry.
                state.next_at = Some(now + (ttl / 3).max(Duration::from_millis(100)));
                if !errors.is_empty() {
                    tracing::debug!(errors = %errors.join("; "), "some discovery replicas failed");
                }
            }
            None => {
                state.failures = state.failures.saturating_add(1);
                let max = state.ttl.map_or(self.backoff.max, |t| {
                    (t / 3).clamp(self.backoff.min, self.backoff.max)
                });
                let backoff = Backoff {
                    min: self.backoff.min,
                    max,
                };
                let delay = backoff.delay(state.failures, fastrand::f64());
                state.next_at = Some(now + delay);
                if state.failures == 1 {
                    tracing::warn!(errors = %errors.join("; "), retry_in = ?delay,
                        "discovery service unreachable: keeping the last seeds, membership goes on by gossip");
                } else {
                    tracing::debug!(errors = %errors.join("; "), retry_in = ?delay, "discovery service still unreachable");
                }
            }
        }
        Ok(state.seeds.clone())
    }

    async fn leave(&self, ctx: &SeedContext) {
        for ep in &self.endpoints {
            let path = format!(
                "{}/v1/clusters/{}/nodes/{}",
                ep.prefix, ctx.cluster_id, ctx.node_id
            );
            match tokio::time::timeout(self.timeout, self.call(ep, Method::DELETE, &path, None))
                .await
            {
                Ok(Ok((StatusCode::NO_CONTENT | StatusCode::NOT_FOUND, _))) => {}
                Ok(Ok((status, body))) => {
                    tracing::debug!(%ep, %status, body = %String::from_utf8_lossy(&body), "deregistration refused")
                }
                Ok(Err(e)) => tracing::debug!(%ep, error = %e, "deregistration failed"),
                Err(_) => tracing::debug!(%ep, "deregistration timed out"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_and_checked() {
        let ep = parse_endpoint("http://discovery:8000").unwrap();
        assert_eq!(
            (ep.https, ep.host.as_str(), ep.port, ep.prefix.as_str()),
            (false, "discovery", 8000, "")
        );
        let ep = parse_endpoint("https://10.0.0.1/mesh/").unwrap();
        assert_eq!(
            (ep.https, ep.port, ep.prefix.as_str()),
            (true, 443, "/mesh")
        );
        let ep = parse_endpoint("http://[::1]:9000").unwrap();
        assert_eq!(ep.host, "::1");
        for bad in ["discovery:8000", "ftp://x", "http://", "not a url"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
        assert!(DiscoverySeeds::new(Vec::<String>::new()).is_err());
        assert!(DiscoverySeeds::new(["https://x"]).unwrap().needs_tls());
    }

    #[tokio::test]
    async fn unreachable_service_keeps_last_seeds_and_backs_off() {
        // Nothing listens on this port (bound then dropped).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = DiscoverySeeds::new([format!("http://127.0.0.1:{port}")]).unwrap();
        let known: SocketAddr = "10.0.0.7:7800".parse().unwrap();
        d.state().seeds = vec![known];
        let ctx = SeedContext {
            cluster_id: "c".into(),
            node_id: socketioxide_core::Uid::new(),
            advertise_addr: "10.0.0.1:7800".parse().unwrap(),
        };
        assert_eq!(d.seeds(&ctx).await.unwrap(), vec![known]);
        let state = d.state();
        assert_eq!(state.failures, 1);
        assert!(state.next_at.is_some_and(|t| t > Instant::now()));
    }
}
