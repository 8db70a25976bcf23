//! One client connection, in three typestates:
//!
//! ```text
//! Greeting --exchange()--> Options --haggle()--> Transmission --serve()--> closed
//!                                 \--(ABORT, bad input, unknown EXPORT_NAME)--> closed
//! ```
//!
//! Negotiation ([`negotiate`]) is async: a connection that has not chosen an export costs a
//! task and a few bytes. Transmission ([`transmission`]) runs on threads of the connection's
//! own, which read a request, run its device call and write its reply without handing it to
//! another thread.

mod negotiate;
mod reply;
mod socket;
mod transmission;

pub(crate) use socket::{IntoBlockingSocket, NotASocket};

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};

use crate::admission::Negotiating;
use crate::proto::ProtoError;
use crate::server::Shared;
use crate::transport::Transport;
use negotiate::Greeting;

/// The context id this server gives `base:allocation` in `NBD_OPT_SET_META_CONTEXT`.
const BASE_ALLOCATION_ID: u32 = 1;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtoError),
    /// The server ends the session on purpose (as the spec requires, e.g. after an
    /// `NBD_OPT_EXPORT_NAME` it cannot satisfy).
    #[error("{0}")]
    Refused(String),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

impl ConnError {
    /// Client-side disconnects are routine, not worth a warning.
    fn is_disconnect(&self) -> bool {
        match self {
            ConnError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

/// Serves one accepted connection until it ends. Never panics on client input; errors are
/// logged here.
pub(crate) async fn run_connection<S>(stream: S, shared: Arc<Shared>, negotiating: Negotiating)
where
    S: IntoBlockingSocket,
{
    let in_flight = Arc::new(AtomicUsize::new(0));
    let session = async {
        // The deadline was set at accept, shorter the more connections were negotiating.
        let options = tokio::time::timeout(negotiating.timeout, async {
            Greeting { io: Transport::Plain(stream) }.exchange().await?.haggle(&shared).await
        })
        .await
        .map_err(|_| ConnError::Refused(format!("handshake not finished within {:?}", negotiating.timeout)))??;
        match options {
            Some(transmission) => {
                let _established = shared
                    .admission
                    .establish(negotiating)
                    .map_err(|refusal| ConnError::Refused(refusal.to_string()))?;
                transmission.serve(&shared, &in_flight).await
            }
            None => Ok(()),
        }
    };
    tokio::select! {
        result = session => match result {
            Ok(()) => debug!("connection closed"),
            Err(e) if e.is_disconnect() => debug!("client disconnected: {e}"),
            Err(e) => info!("connection ended: {e}"),
        },
        () = close_when_drained(&shared, &in_flight) => info!("server shutdown: connection closed"),
    }
}

/// Resolves once the server is shutting down and this connection has been idle for the
/// grace period (in-flight work done, the client had time to see ESHUTDOWN and send DISC),
/// or the drain timeout passed.
async fn close_when_drained(shared: &Shared, in_flight: &AtomicUsize) {
    shared.shutdown.wait().await;
    let deadline = Instant::now() + shared.config.drain_timeout;
    let idle = || async {
        while in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    idle().await;
    tokio::time::sleep_until(deadline.min(Instant::now() + shared.config.shutdown_grace)).await;
    idle().await;
}
