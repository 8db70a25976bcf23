//! The byte stream a migration runs over, and how the source gets a new one after a lost
//! link.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// A migration link: TLS over TCP in production, anything duplex in tests.
pub trait LinkIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> LinkIo for T {}
pub type LinkStream = Box<dyn LinkIo>;

pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = io::Result<LinkStream>> + Send + 'a>>;

/// What a link's transport can tell about its send queue. Before a member of a gang freezes,
/// the gang waits until its links hold nothing unacknowledged (see
/// [`SharedLink::drain`](crate::ratelimit::SharedLink::drain)): the final round and SWITCH
/// would otherwise queue behind the others' data in the network, inside the downtime.
pub trait LinkQueue: Send + Sync + std::fmt::Debug {
    /// Bytes written to the connection that the peer has not acknowledged yet (unsent, or in
    /// flight in the network's queues); None when the transport cannot tell or is closed.
    fn unacknowledged_bytes(&self) -> Option<u64>;
}

/// Opens a connection to the destination's migration listener (called again after a lost
/// link).
pub trait Connector: Send + Sync {
    fn connect(&self) -> ConnectFuture<'_>;
}

impl<F, Fut> Connector for F
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = io::Result<LinkStream>> + Send + 'static,
{
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(self())
    }
}

/// A connector that hands out one stream it was given, and refuses to reconnect (tests and
/// callers that manage the connection themselves).
pub struct OneShot(parking_lot::Mutex<Option<LinkStream>>);

impl std::fmt::Debug for OneShot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OneShot")
    }
}

impl OneShot {
    pub fn new(stream: impl LinkIo + 'static) -> OneShot {
        OneShot(parking_lot::Mutex::new(Some(Box::new(stream))))
    }
}

impl Connector for OneShot {
    fn connect(&self) -> ConnectFuture<'_> {
        let s = self.0.lock().take();
        Box::pin(async move { s.ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "this link cannot reconnect")) })
    }
}

/// Exponential backoff between reconnection attempts: 100 ms doubling to 5 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Duration::from_millis(100) }
    }
}

impl Backoff {
    pub const MAX: Duration = Duration::from_secs(5);

    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling() {
        let mut b = Backoff::default();
        let delays: Vec<u64> = (0..8).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }
}
