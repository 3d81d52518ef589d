//! The HTTP API (axum): versioned JSON under `/v1`, health endpoints, a status page.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | `POST` | `/v1/clusters/{cluster}/nodes` | `{"node_id": "...", "addr": "ip:port"}` | `200 {"seeds": ["ip:port", ...], "ttl_ms": n}`: registered or renewed |
//! | `DELETE` | `/v1/clusters/{cluster}/nodes/{node_id}` | — | `204`, or `404` if unknown |
//! | `GET` | `/v1/clusters/{cluster}/nodes` | — | `200 {"cluster_id", "ttl_ms", "nodes": [{"node_id", "addr", "age_ms"}]}` (empty for an unknown cluster) |
//! | `GET` | `/v1/clusters` | — | `200 {"clusters": [{"cluster_id", "nodes"}]}` |
//! | `GET` | `/v1/stats` | — | `200 {"uptime_s", "nodes", "connections": {"open", "requests", "limit"}, "events": {"<cause>": n, ...}}` |
//! | `GET` | `/healthz`, `/readyz` | — | `200 ok` (`/readyz`: `503` while shutting down) |
//! | `GET` | `/` | — | an HTML status page |
//!
//! Errors are JSON `{"error": "..."}`: `400` malformed JSON, wrong types, invalid ids (on
//! every route that takes one) or an address other nodes cannot dial, `413` body over the
//! limit, `409` registry full, `404` unknown route or node, `408` request not received and
//! answered within the server's request timeout ([`crate::server`]). The event names of
//! `/v1/stats` are those of [`Cause::name`](crate::stats::Cause::name).

use std::{
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{
        DefaultBodyLimit, FromRequest, FromRequestParts, Path, Request, State,
        rejection::JsonRejection,
    },
    http::{StatusCode, request::Parts},
    response::{Html, IntoResponse, Response},
    routing::get,
};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::{
    registry::{Registry, RegistryError, valid_cluster_id, valid_node_id},
    stats::Stats,
};

/// The service's shared state.
pub struct AppState {
    registry: Mutex<Registry>,
    rng: Mutex<fastrand::Rng>,
    started: Instant,
    shutting_down: AtomicBool,
    stats: Stats,
    registrations: AtomicU64,
    renewals: AtomicU64,
    deregistrations: AtomicU64,
    /// Refused registrations, by reason (the order of [`REFUSAL_REASONS`]).
    refusals: [AtomicU64; REFUSAL_REASONS.len()],
}

/// Why a registration was refused, as the `reason` label of
/// `socketioxide_mesh_discovery_refusals_total`.
const REFUSAL_REASONS: [&str; 4] = [
    "invalid_id",
    "invalid_addr",
    "too_many_clusters",
    "too_many_nodes",
];

fn refusal_reason(e: &RegistryError) -> usize {
    match e {
        RegistryError::ClusterId | RegistryError::NodeId => 0,
        RegistryError::Addr(..) => 1,
        RegistryError::TooManyClusters(_) => 2,
        RegistryError::TooManyNodes(_) => 3,
    }
}

impl AppState {
    /// State around a registry.
    pub fn new(registry: Registry) -> Arc<Self> {
        Arc::new(Self {
            registry: Mutex::new(registry),
            rng: Mutex::new(fastrand::Rng::new()),
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            stats: Stats::default(),
            registrations: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
            deregistrations: AtomicU64::new(0),
            refusals: Default::default(),
        })
    }

    /// Connection counters, kept by the server and shown by `/v1/stats`.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Make `/readyz` answer 503 (called on shutdown so load balancers stop sending).
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Drop expired entries now; returns how many.
    pub fn expire(&self) -> usize {
        self.registry().expire(Instant::now())
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An API error, answered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let status = match e {
            RegistryError::TooManyClusters(_) | RegistryError::TooManyNodes(_) => {
                StatusCode::CONFLICT
            }
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, e.to_string())
    }
}

/// `Json` whose rejections are JSON errors: 413 for an oversize body, 400 for the rest.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => {
                let status = match &rejection {
                    r if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                        StatusCode::PAYLOAD_TOO_LARGE
                    }
                    JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    _ => StatusCode::BAD_REQUEST,
                };
                Err(ApiError(status, rejection.body_text()))
            }
        }
    }
}

/// `Path` whose rejections are JSON errors (400), with the ids checked: a cluster id, or a
/// cluster id and a node id, valid as [`Registry::register`] wants them.
pub struct Ids<T>(pub T);

fn check_cluster(cluster: &str) -> Result<(), ApiError> {
    if valid_cluster_id(cluster) {
        Ok(())
    } else {
        Err(RegistryError::ClusterId.into())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ids<String> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(cluster) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
        check_cluster(&cluster)?;
        Ok(Ids(cluster))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Ids<(String, String)> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path((cluster, node)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))?;
        check_cluster(&cluster)?;
        if !valid_node_id(&node) {
            return Err(RegistryError::NodeId.into());
        }
        Ok(Ids((cluster, node)))
    }
}

pub use socketioxide_mesh::seed::discovery_api::{Register, Registered};

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn register(
    State(st): State<Arc<AppState>>,
    Ids(cluster): Ids<String>,
    ApiJson(body): ApiJson<Register>,
) -> Result<Json<Registered>, ApiError> {
    let mut rng = st.rng.lock().unwrap_or_else(|e| e.into_inner());
    let mut registry = st.registry();
    let renewal = registry.contains(&cluster, &body.node_id);
    let seeds = registry
        .register(Instant::now(), &cluster, &body.node_id, body.addr, &mut rng)
        .inspect_err(|e| {
            st.refusals[refusal_reason(e)].fetch_add(1, Ordering::Relaxed);
        })?;
    if renewal {
        &st.renewals
    } else {
        &st.registrations
    }
    .fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%cluster, node = %body.node_id, addr = %body.addr, "registered");
    Ok(Json(Registered {
        seeds,
        ttl_ms: ms(registry.ttl()),
    }))
}

async fn deregister(
    State(st): State<Arc<AppState>>,
    Ids((cluster, node)): Ids<(String, String)>,
) -> Result<StatusCode, ApiError> {
    if st.registry().deregister(&cluster, &node) {
        st.deregistrations.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%cluster, %node, "deregistered");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError(
            StatusCode::NOT_FOUND,
            "no such node in this cluster".into(),
        ))
    }
}

async fn list_nodes(
    State(st): State<Arc<AppState>>,
    Ids(cluster): Ids<String>,
) -> Json<serde_json::Value> {
    let registry = st.registry();
    let nodes: Vec<_> = registry
        .nodes(Instant::now(), &cluster)
        .into_iter()
        .map(|n| json!({ "node_id": n.node_id, "addr": n.addr, "age_ms": ms(n.age) }))
        .collect();
    Json(json!({ "cluster_id": cluster, "ttl_ms": ms(registry.ttl()), "nodes": nodes }))
}

async fn list_clusters(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let clusters: Vec<_> = st
        .registry()
        .clusters(Instant::now())
        .into_iter()
        .map(|(c, n)| json!({ "cluster_id": c, "nodes": n }))
        .collect();
    Json(json!({ "clusters": clusters }))
}

async fn stats(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let events: serde_json::Map<String, serde_json::Value> = st
        .stats
        .counts()
        .into_iter()
        .map(|(cause, n)| (cause.name().to_string(), n.into()))
        .collect();
    Json(json!({
        "uptime_s": st.started.elapsed().as_secs(),
        "nodes": st.registry().num_nodes(),
        "connections": {
            "open": st.stats.open_connections(),
            "requests": st.stats.requests_in_progress(),
            "limit": st.stats.connection_limit(),
        },
        "events": events,
    }))
}

/// Prometheus text exposition, written by hand: a few counters need no metrics library.
async fn metrics(State(st): State<Arc<AppState>>) -> impl IntoResponse {
    let (nodes, clusters, expired) = {
        let r = st.registry();
        (r.num_nodes(), r.num_clusters(), r.expired_total())
    };
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    metric(
        "socketioxide_mesh_discovery_nodes",
        "gauge",
        "Registered nodes, all clusters",
        &[("", nodes as u64)],
    );
    metric(
        "socketioxide_mesh_discovery_clusters",
        "gauge",
        "Clusters with registered nodes",
        &[("", clusters as u64)],
    );
    metric(
        "socketioxide_mesh_discovery_registrations_total",
        "counter",
        "Registrations accepted: new nodes and renewals",
        &[
            ("{kind=\"new\"}", l(&st.registrations)),
            ("{kind=\"renewal\"}", l(&st.renewals)),
        ],
    );
    metric(
        "socketioxide_mesh_discovery_deregistrations_total",
        "counter",
        "Nodes that deregistered (left gracefully)",
        &[("", l(&st.deregistrations))],
    );
    metric(
        "socketioxide_mesh_discovery_expiries_total",
        "counter",
        "Entries dropped for not being renewed within the TTL",
        &[("", expired)],
    );
    let refusals: Vec<(String, u64)> = REFUSAL_REASONS
        .iter()
        .zip(&st.refusals)
        .map(|(r, v)| (format!("{{reason=\"{r}\"}}"), l(v)))
        .collect();
    let refusals: Vec<(&str, u64)> = refusals.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    metric(
        "socketioxide_mesh_discovery_refusals_total",
        "counter",
        "Registrations refused, by reason",
        &refusals,
    );
    metric(
        "socketioxide_mesh_discovery_open_connections",
        "gauge",
        "Open client connections",
        &[("", st.stats.open_connections() as u64)],
    );
    let events: Vec<(String, u64)> = st
        .stats
        .counts()
        .into_iter()
        .map(|(cause, n)| (format!("{{cause=\"{}\"}}", cause.name()), n))
        .collect();
    let events: Vec<(&str, u64)> = events.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    metric(
        "socketioxide_mesh_discovery_connection_events_total",
        "counter",
        "Connections refused or closed by the server, by cause",
        &events,
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}

async fn readyz(State(st): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if st.shutting_down.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else {
        (StatusCode::OK, "ok")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

async fn status_page(State(st): State<Arc<AppState>>) -> Html<String> {
    let now = Instant::now();
    let registry = st.registry();
    let mut html = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>socketioxide-mesh discovery</title>\
         <style>body{font:14px system-ui,sans-serif;margin:2rem}table{border-collapse:collapse;margin-bottom:1.5rem}\
         td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}th{background:#f3f3f3}</style></head><body>\
         <h1>socketioxide-mesh discovery</h1>",
    );
    let _ = write!(
        html,
        "<p>Up {} s. Entries live {} s after their last renewal. {} node(s) registered.</p>",
        st.started.elapsed().as_secs(),
        registry.ttl().as_secs(),
        registry.num_nodes()
    );
    let events: Vec<String> = st
        .stats
        .counts()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(c, n)| format!("{} {n}", c.name()))
        .collect();
    let _ = write!(
        html,
        "<p>{} connection(s) open (limit {}). Connection events: {}.</p>",
        st.stats.open_connections(),
        st.stats.connection_limit(),
        if events.is_empty() {
            "none".to_string()
        } else {
            events.join(", ")
        }
    );
    let clusters = registry.clusters(now);
    if clusters.is_empty() {
        html.push_str("<p>No cluster registered.</p>");
    }
    for (cluster, count) in clusters {
        let _ = write!(
            html,
            "<h2>{} <small>({count} node(s))</small></h2>",
            escape(&cluster)
        );
        html.push_str("<table><tr><th>node</th><th>address</th><th>last renewal</th></tr>");
        for n in registry.nodes(now, &cluster) {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{:.1} s ago</td></tr>",
                escape(&n.node_id),
                n.addr,
                n.age.as_secs_f64()
            );
        }
        html.push_str("</table>");
    }
    html.push_str("</body></html>");
    Html(html)
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such endpoint".into())
}

/// The service's router. Bodies over `max_body` bytes are refused with 413.
pub fn router(state: Arc<AppState>, max_body: usize) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/clusters", get(list_clusters))
        .route("/v1/stats", get(stats))
        .route("/metrics", get(metrics))
        .route(
            "/v1/clusters/{cluster}/nodes",
            get(list_nodes).post(register),
        )
        .route(
            "/v1/clusters/{cluster}/nodes/{node_id}",
            axum::routing::delete(deregister),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Limits;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn app(limits: Limits) -> Router {
        router(
            AppState::new(Registry::new(Duration::from_secs(30), limits)),
            1024,
        )
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        body: Option<&str>,
    ) -> (StatusCode, String) {
        let mut req = Request::builder().method(method).uri(uri);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(body.map(|b| Body::from(b.to_string())).unwrap_or_default())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn error_of(body: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(body).expect("a JSON error body");
        v["error"].as_str().expect("an error field").to_string()
    }

    #[tokio::test]
    async fn register_list_deregister() {
        let app = app(Limits::default());
        let (s, b) = call(
            &app,
            "POST",
            "/v1/clusters/chat/nodes",
            Some(r#"{"node_id":"a","addr":"10.0.0.1:7800"}"#),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let r: Registered = serde_json::from_str(&b).unwrap();
        assert_eq!(
            r,
            Registered {
                seeds: vec![],
                ttl_ms: 30_000
            }
        );
        let (_, b) = call(
            &app,
            "POST",
            "/v1/clusters/chat/nodes",
            Some(r#"{"node_id":"b","addr":"10.0.0.2:7800"}"#),
        )
        .await;
        let r: Registered = serde_json::from_str(&b).unwrap();
        assert_eq!(r.seeds, vec!["10.0.0.1:7800".parse().unwrap()]);

        let (s, b) = call(&app, "GET", "/v1/clusters/chat/nodes", None).await;
        assert_eq!(s, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["nodes"].as_array().unwrap().len(), 2);
        assert_eq!(v["ttl_ms"], 30_000);

        let (s, b) = call(&app, "GET", "/v1/clusters", None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&b).unwrap(),
            json!({"clusters": [{"cluster_id": "chat", "nodes": 2}]})
        );

        let (s, _) = call(&app, "DELETE", "/v1/clusters/chat/nodes/a", None).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, b) = call(&app, "DELETE", "/v1/clusters/chat/nodes/a", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(error_of(&b).contains("no such node"));
    }

    #[tokio::test]
    async fn unknown_cluster_lists_nothing() {
        let app = app(Limits::default());
        let (s, b) = call(&app, "GET", "/v1/clusters/nobody/nodes", None).await;
        assert_eq!(s, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["nodes"], json!([]));
    }

    #[tokio::test]
    async fn bad_requests_get_json_errors() {
        let app = app(Limits::default());
        let cases = [
            ("{not json", StatusCode::BAD_REQUEST),
            (
                r#"{"node_id": 12, "addr": "10.0.0.1:1"}"#,
                StatusCode::BAD_REQUEST,
            ),
            (r#"{"node_id": "a", "addr": 7800}"#, StatusCode::BAD_REQUEST),
            (
                r#"{"node_id": "a", "addr": "not an address"}"#,
                StatusCode::BAD_REQUEST,
            ),
            (r#"{"node_id": "a"}"#, StatusCode::BAD_REQUEST),
            (
                r#"{"node_id": "a", "addr": "10.0.0.1:1", "extra": true}"#,
                StatusCode::BAD_REQUEST,
            ),
            (
                r#"{"node_id": "<script>", "addr": "10.0.0.1:1"}"#,
                StatusCode::BAD_REQUEST,
            ),
            (
                r#"{"node_id": "a", "addr": "0.0.0.0:1"}"#,
                StatusCode::BAD_REQUEST,
            ),
            (r#"[1,2,3]"#, StatusCode::BAD_REQUEST),
        ];
        for (body, want) in cases {
            let (s, b) = call(&app, "POST", "/v1/clusters/chat/nodes", Some(body)).await;
            assert_eq!(s, want, "{body} -> {b}");
            assert!(!error_of(&b).is_empty());
        }
        let (s, b) = call(
            &app,
            "POST",
            "/v1/clusters/bad%20id/nodes",
            Some(r#"{"node_id":"a","addr":"10.0.0.1:1"}"#),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(error_of(&b).contains("cluster id"));
        // Without a JSON content type.
        let req = Request::builder()
            .method("POST")
            .uri("/v1/clusters/chat/nodes")
            .body(Body::from("{}"))
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[tokio::test]
    async fn undialable_addresses_are_400() {
        let app = app(Limits::default());
        for addr in [
            "255.255.255.255:1",
            "224.0.0.1:1",
            "239.1.2.3:7800",
            "[ff02::1]:7800",
            "[::]:7800",
            "0.0.0.0:7800",
            "10.0.0.1:0",
            "[::ffff:224.0.0.1]:1",
        ] {
            let body = format!(r#"{{"node_id":"a","addr":"{addr}"}}"#);
            let (s, b) = call(&app, "POST", "/v1/clusters/chat/nodes", Some(&body)).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{addr} -> {b}");
            let e = error_of(&b);
            assert!(e.contains("invalid address") && e.contains("dial"), "{e}");
        }
        // Loopback: accepted by default (one-host setups), refused when configured.
        let body = r#"{"node_id":"a","addr":"127.0.0.1:7800"}"#;
        let (s, b) = call(&app, "POST", "/v1/clusters/chat/nodes", Some(body)).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let strict = router(
            AppState::new(
                Registry::new(Duration::from_secs(30), Limits::default()).refusing_loopback(true),
            ),
            1024,
        );
        for addr in ["127.0.0.1:7800", "[::1]:7800"] {
            let body = format!(r#"{{"node_id":"a","addr":"{addr}"}}"#);
            let (s, b) = call(&strict, "POST", "/v1/clusters/chat/nodes", Some(&body)).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{addr} -> {b}");
            assert!(error_of(&b).contains("loopback"), "{b}");
        }
        let (s, _) = call(&app, "GET", "/v1/clusters/chat/nodes", None).await;
        assert_eq!(s, StatusCode::OK);
    }

    #[tokio::test]
    async fn ids_are_checked_on_every_route() {
        let app = app(Limits::default());
        let long_node = "n".repeat(129);
        let long_cluster = "c".repeat(65);
        let cases = [
            (
                "DELETE",
                format!("/v1/clusters/chat/nodes/{long_node}"),
                "node id",
            ),
            (
                "DELETE",
                "/v1/clusters/chat/nodes/a%3Cb%3E".to_string(),
                "node id",
            ),
            (
                "DELETE",
                format!("/v1/clusters/{long_cluster}/nodes/a"),
                "cluster id",
            ),
            (
                "DELETE",
                "/v1/clusters/bad%20id/nodes/a".to_string(),
                "cluster id",
            ),
            (
                "GET",
                format!("/v1/clusters/{long_cluster}/nodes"),
                "cluster id",
            ),
            (
                "GET",
                "/v1/clusters/bad%20id/nodes".to_string(),
                "cluster id",
            ),
        ];
        for (method, uri, needle) in cases {
            let (s, b) = call(&app, method, &uri, None).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{method} {uri} -> {b}");
            assert!(error_of(&b).contains(needle), "{method} {uri} -> {b}");
        }
        // Not UTF-8 once decoded: a JSON 400 as well, not axum's plain text.
        let (s, b) = call(&app, "GET", "/v1/clusters/%FF/nodes", None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
        assert!(!error_of(&b).is_empty());
        // The longest valid ids are fine.
        let (s, b) = call(
            &app,
            "DELETE",
            &format!("/v1/clusters/{}/nodes/{}", "c".repeat(64), "n".repeat(128)),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    }

    #[tokio::test]
    async fn stats_are_served() {
        let st = AppState::new(Registry::new(Duration::from_secs(30), Limits::default()));
        let app = router(st.clone(), 1024);
        st.stats().record(crate::stats::Cause::TlsRefused, "test");
        let (s, b) = call(&app, "GET", "/v1/stats", None).await;
        assert_eq!(s, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["events"]["tls_refused"], 1, "{v}");
        assert_eq!(v["events"]["accept_error"], 0, "{v}");
        assert_eq!(v["connections"]["open"], 0, "{v}");
        let (_, page) = call(&app, "GET", "/", None).await;
        assert!(page.contains("tls_refused 1"), "{page}");
    }

    #[tokio::test]
    async fn metrics_count_registrations_renewals_refusals_and_expiries() {
        let st = AppState::new(Registry::new(Duration::from_millis(1), Limits::default()));
        let app = router(st.clone(), 1024);
        let post = |body: &'static str| {
            let app = app.clone();
            async move {
                call(&app, "POST", "/v1/clusters/chat/nodes", Some(body))
                    .await
                    .0
            }
        };
        assert_eq!(
            post(r#"{"node_id":"a","addr":"10.0.0.1:7800"}"#).await,
            StatusCode::OK
        );
        assert_eq!(
            post(r#"{"node_id":"a","addr":"10.0.0.1:7800"}"#).await,
            StatusCode::OK
        );
        assert_eq!(
            post(r#"{"node_id":"b","addr":"255.255.255.255:1"}"#).await,
            StatusCode::BAD_REQUEST
        );
        let (s, text) = call(&app, "GET", "/metrics", None).await;
        assert_eq!(s, StatusCode::OK);
        for line in [
            "socketioxide_mesh_discovery_nodes 1",
            "socketioxide_mesh_discovery_registrations_total{kind=\"new\"} 1",
            "socketioxide_mesh_discovery_registrations_total{kind=\"renewal\"} 1",
            "socketioxide_mesh_discovery_refusals_total{reason=\"invalid_addr\"} 1",
            "socketioxide_mesh_discovery_refusals_total{reason=\"too_many_nodes\"} 0",
            "# TYPE socketioxide_mesh_discovery_expiries_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // The TTL (1 ms) passes: the sweep drops the entry, and it is counted.
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(st.expire(), 1);
        let (_, text) = call(&app, "GET", "/metrics", None).await;
        assert!(
            text.lines()
                .any(|l| l == "socketioxide_mesh_discovery_expiries_total 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn oversize_body_is_413() {
        let app = app(Limits::default());
        let big = format!(
            r#"{{"node_id":"{}","addr":"10.0.0.1:1"}}"#,
            "a".repeat(5000)
        );
        let (s, b) = call(&app, "POST", "/v1/clusters/chat/nodes", Some(&big)).await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{b}");
        assert!(!error_of(&b).is_empty());
    }

    #[tokio::test]
    async fn too_many_nodes_is_409() {
        let app = app(Limits {
            max_clusters: 4,
            max_nodes_per_cluster: 2,
            seeds_per_reply: 3,
        });
        for (i, want) in [StatusCode::OK, StatusCode::OK, StatusCode::CONFLICT]
            .into_iter()
            .enumerate()
        {
            let body = format!(r#"{{"node_id":"n{i}","addr":"10.0.0.{}:1"}}"#, i + 1);
            let (s, b) = call(&app, "POST", "/v1/clusters/chat/nodes", Some(&body)).await;
            assert_eq!(s, want, "{b}");
            if want == StatusCode::CONFLICT {
                assert!(error_of(&b).contains("too many nodes"));
            }
        }
    }

    #[tokio::test]
    async fn health_status_page_and_unknown_routes() {
        let app = app(Limits::default());
        call(
            &app,
            "POST",
            "/v1/clusters/chat/nodes",
            Some(r#"{"node_id":"n1","addr":"10.0.0.9:7800"}"#),
        )
        .await;
        assert_eq!(
            call(&app, "GET", "/healthz", None).await,
            (StatusCode::OK, "ok".into())
        );
        assert_eq!(call(&app, "GET", "/readyz", None).await.0, StatusCode::OK);
        let (s, page) = call(&app, "GET", "/", None).await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            page.contains("<h2>chat") && page.contains("10.0.0.9:7800") && page.contains("n1"),
            "{page}"
        );
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "no external assets"
        );
        let (s, b) = call(&app, "GET", "/v2/whatever", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(!error_of(&b).is_empty());
        let (s, _) = call(&app, "PUT", "/v1/clusters/chat/nodes", Some("{}")).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn readyz_is_503_while_shutting_down() {
        let st = AppState::new(Registry::new(Duration::from_secs(30), Limits::default()));
        let app = router(st.clone(), 1024);
        st.set_shutting_down();
        assert_eq!(
            call(&app, "GET", "/readyz", None).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
