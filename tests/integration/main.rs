//! The integration suite: real nodes (QUIC + mutual TLS on 127.0.0.1), real Socket.IO clients.

mod adapter;
mod bad_input;
mod client;
mod common;
mod death;
mod js;
mod ordering;
mod process;
mod raw;
mod security;
