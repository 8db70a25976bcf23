//! Who may open a connection, and for how long it may take to negotiate.
//!
//! A hypervisor host that reconnects (after a restart, a switch-over, a kernel `nbd-client`
//! timeout) must get in even while a broken or hostile peer floods the listener. So:
//!
//! * Connections still negotiating have a budget of their own (`max_negotiating`), separate
//!   from established ones (`max_established`), and a per-peer share of it (by source address;
//!   Unix-socket clients share one key, the socket's file mode guards them).
//! * The handshake deadline tightens as the negotiating budget fills: the full timeout while
//!   it is empty, down to `min_handshake_timeout` when it is nearly full, so idle connections
//!   cannot hold it for long.
//! * An established connection is never dropped to make room: a newcomer that finds the
//!   established budget full is refused after negotiating.
//! * A refusal is logged with the peer, at most once per peer per `LOG_INTERVAL` (and the
//!   table that remembers when is bounded).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// How often a refusal of one peer is logged at most.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Peers whose last refusal time is remembered at most.
const LOG_PEERS: usize = 4096;

/// The limits (see [`crate::server::ServerConfig`]).
#[derive(Debug, Clone)]
pub struct AdmissionLimits {
    pub max_negotiating: usize,
    pub max_negotiating_per_peer: usize,
    pub max_established: usize,
    pub handshake_timeout: Duration,
    pub min_handshake_timeout: Duration,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many connections negotiating")]
    Negotiating,
    #[error("too many connections negotiating from this peer")]
    PeerNegotiating,
    #[error("too many established connections")]
    Established,
}

#[derive(Debug, Default)]
struct Negotiations {
    total: usize,
    by_peer: HashMap<Option<IpAddr>, usize>,
}

/// A listener's admission state (shared by its connections).
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    negotiating: Mutex<Negotiations>,
    established: AtomicUsize,
    logged: Mutex<HashMap<Option<IpAddr>, Instant>>,
    /// What listener this is, for the logs.
    what: &'static str,
}

/// A connection admitted to negotiate for at most `timeout`; gives its place back when dropped.
#[derive(Debug)]
pub struct Negotiating {
    admission: Arc<Admission>,
    peer: Option<IpAddr>,
    pub timeout: Duration,
}

/// An established connection's place; given back when dropped.
#[derive(Debug)]
pub struct Established(Arc<Admission>);

impl Admission {
    pub fn new(what: &'static str, limits: AdmissionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits,
            negotiating: Mutex::new(Negotiations::default()),
            established: AtomicUsize::new(0),
            logged: Mutex::new(HashMap::new()),
            what,
        })
    }

    /// Admits a new connection from `peer` to negotiate, with a deadline that is shorter the
    /// fuller the negotiating budget is.
    pub fn begin(self: &Arc<Self>, peer: Option<IpAddr>) -> Result<Negotiating, Refusal> {
        let mut n = self.negotiating.lock();
        if n.total >= self.limits.max_negotiating {
            return Err(Refusal::Negotiating);
        }
        let mine = n.by_peer.entry(peer).or_insert(0);
        if *mine >= self.limits.max_negotiating_per_peer {
            return Err(Refusal::PeerNegotiating);
        }
        *mine += 1;
        n.total += 1;
        let free = 1.0 - n.total as f64 / self.limits.max_negotiating as f64;
        let timeout = self.limits.handshake_timeout.mul_f64(free).max(self.limits.min_handshake_timeout);
        Ok(Negotiating { admission: Arc::clone(self), peer, timeout })
    }

    /// The connection finished negotiating: it leaves the negotiating budget for the
    /// established one.
    pub fn establish(self: &Arc<Self>, negotiating: Negotiating) -> Result<Established, Refusal> {
        drop(negotiating);
        let previous = self.established.fetch_add(1, Ordering::SeqCst);
        let place = Established(Arc::clone(self));
        if previous >= self.limits.max_established {
            drop(place);
            return Err(Refusal::Established);
        }
        Ok(place)
    }

    /// Logs a refusal, at most once per peer per interval.
    pub fn log_refusal(&self, peer: Option<IpAddr>, refusal: Refusal) {
        let now = Instant::now();
        let mut logged = self.logged.lock();
        if logged.get(&peer).is_some_and(|at| now.duration_since(*at) < LOG_INTERVAL) {
            return;
        }
        if logged.len() >= LOG_PEERS {
            logged.retain(|_, at| now.duration_since(*at) < LOG_INTERVAL);
            if logged.len() >= LOG_PEERS {
                return;
            }
        }
        logged.insert(peer, now);
        drop(logged);
        let peer = peer.map_or_else(|| "unix socket".to_string(), |p| p.to_string());
        tracing::warn!(listener = self.what, %peer, "connection refused: {refusal} (logged once per {LOG_INTERVAL:?} per peer)");
    }

    /// Connections negotiating now.
    pub fn negotiating(&self) -> usize {
        self.negotiating.lock().total
    }

    pub fn established(&self) -> usize {
        self.established.load(Ordering::SeqCst)
    }
}

impl Drop for Negotiating {
    fn drop(&mut self) {
        let mut n = self.admission.negotiating.lock();
        n.total -= 1;
        if let Some(c) = n.by_peer.get_mut(&self.peer) {
            *c -= 1;
            if *c == 0 {
                n.by_peer.remove(&self.peer);
            }
        }
    }
}

impl Drop for Established {
    fn drop(&mut self) {
        self.0.established.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            max_negotiating: 10,
            max_negotiating_per_peer: 4,
            max_established: 2,
            handshake_timeout: Duration::from_secs(30),
            min_handshake_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn budgets_per_peer_and_in_all_with_a_tightening_deadline() {
        let a = Admission::new("test", limits());
        let flood: IpAddr = "127.0.0.2".parse().unwrap();
        let mut held: Vec<Negotiating> = (0..4).map(|_| a.begin(Some(flood)).unwrap()).collect();
        assert_eq!(a.begin(Some(flood)).unwrap_err(), Refusal::PeerNegotiating);
        assert!(held[0].timeout > held[3].timeout, "the deadline tightens as the budget fills");
        // Another peer still gets in.
        let other = a.begin(Some("127.0.0.1".parse().unwrap())).unwrap();
        for i in 0..5 {
            held.push(a.begin(Some(format!("10.0.0.{i}").parse().unwrap())).unwrap());
        }
        assert_eq!(a.begin(None).unwrap_err(), Refusal::Negotiating);
        let last = held.pop().unwrap();
        assert_eq!(last.timeout, Duration::from_secs(1), "a nearly full budget: the minimum deadline");
        drop(last);
        // Established connections have their own budget; a full one refuses the newcomer.
        let e1 = a.establish(other).unwrap();
        let e2 = a.establish(held.pop().unwrap()).unwrap();
        assert_eq!(a.establish(held.pop().unwrap()).unwrap_err(), Refusal::Established);
        assert_eq!(a.established(), 2);
        drop((e1, e2));
        held.clear();
        assert_eq!(a.negotiating(), 0);
        assert_eq!(a.established(), 0);
    }
}
