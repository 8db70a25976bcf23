//! An NBD server with in-memory exports and no store: measures the protocol path alone.
//!
//! `cargo run --release -p nbd-server --example mem_server -- 127.0.0.1:10809 disk:1G [more:64M]`

use std::sync::Arc;

use nbd_server::{serve, Export, ExportRegistry, Listener, MemDevice, ServerConfig};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:10809".to_owned());
    let registry = Arc::new(ExportRegistry::new());
    for spec in args {
        let (name, size) = spec.split_once(':').expect("NAME:SIZE");
        let size: u64 = match size.strip_suffix('G') {
            Some(g) => g.parse::<u64>().unwrap() << 30,
            None => {
                size.strip_suffix('M').map(|m| m.parse::<u64>().unwrap() << 20).unwrap_or_else(|| size.parse().unwrap())
            }
        };
        registry.insert(Arc::new(Export::new(name, Arc::new(MemDevice::new(size)))));
    }
    let listener = Listener::bind_tcp(&addr).await?;
    println!("listening on {}", listener.describe());
    serve(vec![listener], registry, ServerConfig::default(), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}
