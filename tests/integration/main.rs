//! The integration suite: real nodes (QUIC or WebSocket, mutual TLS, on 127.0.0.1), real
//! Socket.IO clients. Every test runs once per transport.

/// Instantiate `async fn name(kind: TransportKind)` tests once per transport.
macro_rules! both_transports {
    ($($name:ident),* $(,)?) => {
        mod quic {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(socketioxide_mesh::TransportKind::Quic).await
                }
            )*
        }
        mod ws {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(socketioxide_mesh::TransportKind::Ws).await
                }
            )*
        }
    };
}

mod adapter;
mod bad_input;
mod client;
mod common;
mod death;
mod discovery;
mod formation;
mod js;
mod losses;
mod metrics;
mod mixed;
mod ordering;
mod process;
mod raw;
mod routing;
mod security;
mod soak;
