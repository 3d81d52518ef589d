//! The integration suite: real nodes (QUIC + mutual TLS on 127.0.0.1), real Socket.IO clients.

mod adapter;
mod client;
mod common;
mod ordering;
