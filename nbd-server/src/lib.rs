//! An NBD (Network Block Device) server on tokio.
//!
//! * [`proto`]: the wire protocol as a pure codec (no I/O).
//! * [`export`]: the [`BlockDevice`] trait, [`Export`]s (name, read-only, freeze, counters)
//!   and the runtime-mutable [`ExportRegistry`]; an in-memory device and the CAS-store device.
//! * [`server`]: listeners (TCP, Unix), TLS, connection limits, graceful shutdown.
//! * `conn` (private): one connection, negotiation then concurrent transmission.
//!
//! ```no_run
//! use std::sync::Arc;
//! use nbd_server::{serve, Export, ExportRegistry, Listener, MemDevice, ServerConfig};
//!
//! # async fn run() -> std::io::Result<()> {
//! let registry = Arc::new(ExportRegistry::new());
//! registry.insert(Arc::new(Export::new("disk", Arc::new(MemDevice::new(64 << 20)))));
//! let listeners = vec![Listener::bind_tcp("127.0.0.1:10809").await?];
//! serve(listeners, registry, ServerConfig::default(), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await;
//! # Ok(()) }
//! ```

pub mod access;
pub mod admission;
pub mod arenas;
mod budget;
mod buffer;
pub mod compaction;
mod conn;
#[cfg(feature = "cas")]
pub mod control;
pub mod export;
pub mod link_socket;
pub mod link_tls;
#[cfg(feature = "cas")]
pub mod metrics;
#[cfg(feature = "cas")]
pub mod node;
pub mod proto;
pub mod server;
pub mod tls;
mod transport;

#[cfg(feature = "cas")]
pub use export::CasDevice;
pub use export::{
    BlockDevice, DeviceError, DeviceResult, Export, ExportRegistry, ExportStats, Extent, MemDevice, Op, StatsSnapshot,
};
pub use server::{serve, Listener, Server, ServerConfig, ShutdownHandle};
pub use tls::{TlsConfig, TlsError};

#[cfg(test)]
mod tests;
