//! Helpers shared by the migration test files.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cas_store::Store;
use migration::SourceHooks;

/// A disk's whole content.
pub fn read_all(store: &Store, name: &str) -> Vec<u8> {
    let d = store.disk(name).unwrap();
    let mut buf = vec![0u8; d.size as usize];
    store.read(d.id, 0, &mut buf).unwrap();
    buf
}

/// Freezing stops the writer, as a frozen NBD export would: no new writes, and the one in
/// flight finishes first (the writer holds the gate shared while it writes).
pub struct WriterFreeze {
    pub frozen: Arc<AtomicBool>,
    pub gate: Arc<parking_lot::RwLock<()>>,
}

impl SourceHooks for WriterFreeze {
    fn freeze<'a>(&'a self, _: &'a str) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let (gate, frozen) = (self.gate.clone(), self.frozen.clone());
            tokio::task::spawn_blocking(move || {
                let _exclusive = gate.write();
                frozen.store(true, Ordering::SeqCst);
            })
            .await
            .map_err(|e| e.to_string())
        })
    }
    fn thaw(&self, _: &str) {
        self.frozen.store(false, Ordering::SeqCst);
    }
    fn switched(&self, _: &str) {}
}
