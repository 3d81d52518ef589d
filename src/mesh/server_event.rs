//! Server-side events between nodes (Socket.IO's `serverSideEmit`).

use std::{fmt, sync::Arc};

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use socketioxide_core::Uid;
use tokio::sync::oneshot;

use crate::Error;

/// A server-side event received from another node ([`Mesh::on_server_event`](super::Mesh::on_server_event)).
pub struct ServerEvent {
    /// The node that emitted it.
    pub from: Uid,
    /// The event name.
    pub event: String,
    pub(crate) data: Bytes,
    pub(crate) ack: Option<oneshot::Sender<Bytes>>,
}

impl fmt::Debug for ServerEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerEvent")
            .field("from", &self.from)
            .field("event", &self.event)
            .field("len", &self.data.len())
            .field("wants_ack", &self.ack.is_some())
            .finish()
    }
}

impl ServerEvent {
    /// Decode the event's data.
    pub fn data<T: DeserializeOwned>(&self) -> Result<T, Error> {
        rmp_serde::from_slice(&self.data).map_err(|e| Error::Decode(e.to_string()))
    }

    /// Whether the emitter waits for an answer ([`Mesh::server_side_emit_with_ack`](super::Mesh::server_side_emit_with_ack)).
    pub fn wants_ack(&self) -> bool {
        self.ack.is_some()
    }

    /// Answer the emitter. Does nothing if it did not ask for an answer.
    pub fn ack<T: Serialize + ?Sized>(mut self, value: &T) -> Result<(), Error> {
        if let Some(tx) = self.ack.take() {
            let bytes = rmp_serde::to_vec(value).map_err(|e| Error::Encode(e.to_string()))?;
            // The emitter may have given up waiting; nothing to do then.
            let _ = tx.send(Bytes::from(bytes));
        }
        Ok(())
    }
}

pub(crate) type ServerEventHandler = Arc<dyn Fn(ServerEvent) + Send + Sync>;
