#![warn(missing_docs)]
//! # socketioxide-mesh-discovery
//!
//! The seed discovery service of [socketioxide-mesh](https://docs.rs/socketioxide-mesh): nodes
//! register (and renew before a TTL), and get back a few live addresses of their cluster. That
//! is all: it holds no mesh state. Membership spreads by gossip, so the mesh keeps working when
//! this service restarts, runs several replicas, or is down; a node that knows any live member
//! joins without it.
//!
//! - [`registry`]: the sans-IO registry (TTL, limits, seed selection), unit-tested with a
//!   virtual clock;
//! - [`api`]: the HTTP JSON API, health endpoints and status page (axum);
//! - [`server`]: plain HTTP or HTTPS with client certificates, bounded (connection limit,
//!   header, idle, request and TLS handshake timeouts), graceful shutdown;
//! - [`stats`]: counters of refused and closed connections, logged at a bounded rate.
//!
//! ```no_run
//! use std::time::Duration;
//! use socketioxide_mesh_discovery::{api, registry::{Limits, Registry}, server};
//! # async fn run() -> std::io::Result<()> {
//! let state = api::AppState::new(Registry::new(Duration::from_secs(30), Limits::default()));
//! let router = api::router(state.clone(), 16 * 1024);
//! let listener = tokio::net::TcpListener::bind("0.0.0.0:8000").await?;
//! let config = server::ServerConfig::default();
//! server::serve(listener, state, router, None, config, async { tokio::signal::ctrl_c().await.ok(); }).await
//! # }
//! ```

pub mod api;
pub mod registry;
pub mod server;
pub mod stats;
