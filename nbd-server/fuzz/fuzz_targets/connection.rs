//! Fuzzes a whole connection: the input is everything a client sends (handshake, options,
//! requests, payloads), fed to the real server over an in-memory stream with a small
//! in-memory export. The server must neither panic nor hang, whatever arrives.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nbd_server::{Export, ExportRegistry, MemDevice, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let registry = Arc::new(ExportRegistry::new());
        registry.insert(Arc::new(Export::new("disk", Arc::new(MemDevice::new(1 << 20)))));
        registry.insert(Arc::new(Export::new("ro", Arc::new(MemDevice::new(64 << 10))).with_read_only(true)));
        registry.set_default(Some("disk"));
        let config = ServerConfig {
            handshake_timeout: Duration::from_secs(2),
            payload_stall_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        };
        let server = Arc::new(Server::new(registry, config));
        let (client, server_side) = tokio::io::duplex(1 << 16);
        let serving = {
            let server = server.clone();
            tokio::spawn(async move { server.serve_stream(server_side).await })
        };
        let (mut rd, mut wr) = tokio::io::split(client);
        // Drain whatever the server answers, so it never blocks on a full pipe.
        let draining = tokio::spawn(async move {
            let mut sink = vec![0u8; 1 << 16];
            while let Ok(n) = rd.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        });
        let _ = wr.write_all(data).await;
        let _ = wr.shutdown().await;
        // EOF reaches the server: the connection must end promptly.
        tokio::time::timeout(Duration::from_secs(10), serving).await.expect("connection hung").unwrap();
        drop(wr);
        let _ = tokio::time::timeout(Duration::from_secs(10), draining).await;
    });
});
