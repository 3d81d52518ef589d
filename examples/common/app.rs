//! The Socket.IO application shared by the examples: a chat with rooms, plus a few events that
//! exercise every cross-node operation (used by the JS client interop test too).

use std::{net::SocketAddr, time::Duration};

use axum::{Json, Router, response::Html, routing::get};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use socketioxide::{
    SocketIo,
    adapter::Emitter,
    extract::{AckSender, Data, SocketRef},
    handler::ConnectHandler,
};
use socketioxide_mesh::{Mesh, MeshAdapter};

pub type A = MeshAdapter<Emitter>;

const PAGE: &str = include_str!("chat.html");

#[derive(Deserialize)]
struct ToRoom {
    room: String,
    event: String,
    data: Value,
}

#[derive(Deserialize)]
struct BinToRoom {
    room: String,
    data: bytes::Bytes,
}

#[derive(Serialize)]
struct SocketInfo {
    id: String,
    server: String,
    ns: String,
}

/// Event handlers. They are registered from a connect middleware so they exist before the
/// client's first event can arrive (socketioxide 0.18 answers the connect before an async
/// connect handler runs).
fn register(s: &SocketRef<A>, io: SocketIo<A>) {
    s.on(
        "join",
        async |s: SocketRef<A>, Data(room): Data<String>, ack: AckSender<A>| {
            s.join(room);
            let _ = ack.send("joined");
        },
    );
    s.on(
        "leave",
        async |s: SocketRef<A>, Data(room): Data<String>, ack: AckSender<A>| {
            s.leave(room);
            let _ = ack.send("left");
        },
    );
    // Chat: to everyone else, on every node.
    s.on("chat", async |s: SocketRef<A>, Data(msg): Data<Value>| {
        let _ = s.broadcast().emit("chat", &msg).await;
    });
    // Emit to a room, wherever its sockets are.
    s.on(
        "to-room",
        async |s: SocketRef<A>, Data(req): Data<ToRoom>, ack: AckSender<A>| {
            let res = s.within(req.room).emit(req.event, &req.data).await;
            let _ = ack.send(&res.is_ok());
        },
    );
    // Binary data to a room: `{room, data}`, emitted as event "bin".
    s.on(
        "bin-to-room",
        async |s: SocketRef<A>, Data(req): Data<BinToRoom>, ack: AckSender<A>| {
            let res = s.within(req.room).emit("bin", &req.data).await;
            let _ = ack.send(&res.is_ok());
        },
    );
    let io2 = io.clone();
    // The sockets of the cluster, optionally in one room.
    s.on(
        "fetch",
        async move |Data(room): Data<Option<String>>, ack: AckSender<A>| {
            let op = match room {
                Some(r) => io2.to(r),
                None => io2.broadcast(),
            };
            let list: Vec<SocketInfo> = match op.fetch_sockets().await {
                Ok(sockets) => sockets
                    .iter()
                    .map(|s| SocketInfo {
                        id: s.data().id.to_string(),
                        server: s.data().server_id.to_string(),
                        ns: s.data().ns.to_string(),
                    })
                    .collect(),
                Err(_) => Vec::new(),
            };
            let _ = ack.send(&list);
        },
    );
    let io3 = io.clone();
    s.on("rooms", async move |ack: AckSender<A>| {
        let mut rooms: Vec<String> = io3
            .rooms()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.to_string())
            .collect();
        rooms.sort();
        let _ = ack.send(&rooms);
    });
    let io4 = io.clone();
    // Ask every socket of the cluster (but the asker) a question, answer with all replies.
    s.on(
        "ask-all",
        async move |s: SocketRef<A>, Data(q): Data<Value>, ack: AckSender<A>| {
            let _ = &io4;
            let answers: Vec<Value> = match s
                .broadcast()
                .timeout(Duration::from_secs(5))
                .emit_with_ack::<_, Value>("question", &q)
                .await
            {
                Ok(stream) => {
                    stream
                        .filter_map(|(_, r)| async move { r.ok() })
                        .collect()
                        .await
                }
                Err(_) => Vec::new(),
            };
            let _ = ack.send(&answers);
        },
    );
    let io5 = io.clone();
    // Operations on a socket of any node, by id.
    s.on(
        "remote",
        async move |Data(req): Data<Value>, ack: AckSender<A>| {
            let id = req["id"].as_str().unwrap_or_default().to_string();
            let sockets = io5.fetch_sockets().await.unwrap_or_default();
            let Some(remote) = sockets.into_iter().find(|s| s.data().id.to_string() == id) else {
                let _ = ack.send(&json!({"error": "no such socket"}));
                return;
            };
            let res = match req["op"].as_str().unwrap_or_default() {
                "emit" => json!(remote.emit("direct", &req["data"]).await.is_ok()),
                "join" => json!(
                    remote
                        .join(req["room"].as_str().unwrap_or_default().to_string())
                        .await
                        .is_ok()
                ),
                "leave" => json!(
                    remote
                        .leave(req["room"].as_str().unwrap_or_default().to_string())
                        .await
                        .is_ok()
                ),
                "rooms" => json!(
                    remote
                        .rooms()
                        .await
                        .unwrap_or_default()
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                ),
                "ask" => match remote
                    .emit_with_ack::<_, Value>("question", &req["data"])
                    .await
                {
                    Ok(stream) => json!(
                        stream
                            .filter_map(|(_, r)| async move { r.ok() })
                            .collect::<Vec<_>>()
                            .await
                    ),
                    Err(e) => json!({"error": e.to_string()}),
                },
                "disconnect" => json!(remote.disconnect().await.is_ok()),
                op => json!({"error": format!("unknown op {op}")}),
            };
            let _ = ack.send(&res);
        },
    );
}

/// The page's Socket.IO client: a small one written for this project (`client.js`), built
/// into the binary, so the demo works offline.
async fn client_js() -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, "text/javascript")],
        include_str!("client.js"),
    )
        .into_response()
}

/// The process's Prometheus recorder, installed at the first call: the mesh records through
/// the `metrics` facade, this renders it for `/metrics`. (The in-process demo's nodes share it:
/// run them as separate processes for per-node metrics.)
fn prometheus() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
            // Latencies as Prometheus histograms (the exporter's default is a summary).
            let builder = builder
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &[
                        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0,
                    ],
                )
                .unwrap_or_else(|_| metrics_exporter_prometheus::PrometheusBuilder::new());
            let recorder = builder
                // Peers that left stop being reported after a while.
                .idle_timeout(
                    metrics_util::MetricKindMask::GAUGE,
                    Some(std::time::Duration::from_secs(60)),
                )
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may be installed already (an application embedding this app).
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Build the Socket.IO layer on `mesh` (MessagePack parser when `msgpack` is set: clients must
/// use `socket.io-msgpack-parser` then) and serve it with the chat page and a `/mesh` status
/// endpoint on `addr`. Returns the bound address and the server's `SocketIo`.
pub async fn serve(
    mesh: Mesh,
    addr: SocketAddr,
    msgpack: bool,
) -> anyhow::Result<(SocketAddr, SocketIo<A>)> {
    let mut builder = SocketIo::builder().max_buffer_size(4096);
    if msgpack {
        builder = builder.with_parser(socketioxide::ParserConfig::msgpack());
    }
    let (layer, io) = builder.with_adapter::<A>(mesh.clone()).build_layer();
    for ns in ["/", "/admin"] {
        let io2 = io.clone();
        let middleware = move |s: SocketRef<A>| {
            register(&s, io2.clone());
            async { Ok::<(), std::convert::Infallible>(()) }
        };
        io.ns(ns, (async || {}).with(middleware))
            .await
            .map_err(|e| anyhow::anyhow!("namespace {ns}: {e}"))?;
    }
    let status_mesh = mesh.clone();
    let metrics_mesh = mesh.clone();
    let ready_mesh = mesh.clone();
    let topology_mesh = mesh.clone();
    let events_mesh = mesh.clone();
    let prometheus = prometheus();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let (mesh, prometheus) = (metrics_mesh.clone(), prometheus.clone());
                async move {
                    // Counters of the moment, not of the last second.
                    mesh.record_metrics();
                    prometheus.render()
                }
            }),
        )
        .route("/", get(|| async { Html(PAGE) }))
        .route("/client.js", get(client_js))
        .route(
            "/topology",
            get(|| async { Html(include_str!("topology.html")) }),
        )
        .route(
            "/topology.json",
            get(move || {
                let t = topology_mesh.topology();
                async move { Json(t) }
            }),
        )
        // The picture, pushed once a second (server-sent events).
        .route(
            "/topology/events",
            get(move || {
                let mesh = events_mesh.clone();
                async move {
                    let ticks = tokio::time::interval(Duration::from_secs(1));
                    let stream = futures_util::stream::unfold(ticks, move |mut ticks| {
                        let mesh = mesh.clone();
                        async move {
                            ticks.tick().await;
                            let event = axum::response::sse::Event::default()
                                .json_data(mesh.topology())
                                .map_err(|e| std::io::Error::other(e.to_string()));
                            Some((event, ticks))
                        }
                    });
                    axum::response::sse::Sse::new(stream)
                        .keep_alive(axum::response::sse::KeepAlive::default())
                }
            }),
        )
        // Liveness: the process serves HTTP.
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        // Readiness: joined the mesh, connected to every live member.
        .route(
            "/readyz",
            get(move || {
                let ready = ready_mesh.ready();
                async move {
                    if ready {
                        (axum::http::StatusCode::OK, "ready")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "joining the mesh",
                        )
                    }
                }
            }),
        )
        .route(
            "/mesh",
            get(move || {
                let mesh = status_mesh.clone();
                async move {
                    let members: Vec<Value> = mesh
                        .members()
                        .iter()
                        .map(|m| {
                            json!({"node_id": m.node_id.to_string(), "addr": m.addr.to_string(),
                            "namespaces": m.namespaces, "sockets": m.sockets})
                        })
                        .collect();
                    Json(json!({
                        "node_id": mesh.node_id().to_string(),
                        "addr": mesh.advertise_addr().to_string(),
                        "members": members,
                        "stats": mesh.stats(),
                    }))
                }
            }),
        )
        .layer(layer);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    // Socket.IO messages are small: without TCP_NODELAY, Nagle's algorithm and delayed ACKs
    // hold some of them for ~40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "http server stopped");
        }
    });
    Ok((bound, io))
}
