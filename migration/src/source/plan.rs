//! Plans: what moving a disk to a destination would cost, without moving it.

use std::sync::Arc;

use cas_store::{Fingerprint, Store};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::*;
use crate::compress::{encode_records, Record, RecordLayout};
use crate::protocol::{Hello, Message, Mode};
use crate::report::PlanReport;
use crate::stream::{StreamEncoder, StreamId};
use crate::wire::{exchange_greetings, read_message, write_frame, Frame, Traffic};
use crate::{blocking, MigrationError};

pub(crate) async fn send(tx: &mpsc::Sender<Frame>, msg: Message) -> Result<(), MigrationError> {
    tx.send(Frame::new(&msg)).await.map_err(|_| MigrationError::Closed)
}

/// Streams a map snapshot for a plan (no resume: a plan is cheap to run again), its blocks
/// numbered from `first` on (a gang's disks follow one another in one listing).
pub(crate) async fn send_plan_snapshot(mut snapshot: cas_store::MapSnapshot, tx: &mpsc::Sender<Frame>, first: u64) -> Result<u64, MigrationError> {
    let mut listed = 0u64;
    loop {
        let (batch, snap) = next_batch(snapshot).await?;
        snapshot = snap;
        if batch.is_empty() {
            return Ok(listed);
        }
        listed += batch.len() as u64;
        let runs = runs_of(batch.into_iter().map(|(b, fp)| (first + b, Some(fp))));
        send(tx, Message::Fingerprints { round: 0, runs }).await?;
    }
}

/// Compares a disk's fingerprints with a destination's store without moving any data. Several
/// disks (a gang) are planned as one migration of all of them: content they share, or that
/// occurs twice among them, counts once, as a gang migration sends it once.
pub async fn run_plan<S>(
    store: Arc<Store>,
    disks: &[String],
    destination: &str,
    mut stream: S,
    link_rate_bps: Option<u64>,
    zstd_level: i32,
) -> Result<PlanReport, MigrationError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let traffic = Traffic::default();
    exchange_greetings(&mut stream, &traffic).await?;
    let infos = disks.iter().map(|d| store.disk(d)).collect::<Result<Vec<_>, _>>()?;
    let disk = disks.join("+");
    let bs = u64::from(store.block_size());
    let size: u64 = infos.iter().map(|i| i.size.div_ceil(bs) * bs).sum();
    let hello = Hello {
        migration_id: format!("plan-{disk}"),
        disk: disk.clone(),
        size,
        block_size: store.block_size(),
        algorithm: store.algorithm().name().to_string(),
        mode: Mode::Plan,
        resume: false,
        rebuild: false,
        defer_dirty: false,
        read_through: false,
        data_stream: false,
        delta: false,
        gang: None,
        unnamed_blocks: false,
        want_listed: false,
    };
    crate::wire::write_message(&mut stream, &Message::Hello(hello), &traffic).await?;
    match read_message(&mut stream, &traffic).await? {
        Some(Message::Accept(_)) => {}
        Some(Message::Error(e)) => return Err(MigrationError::Refused(e.message)),
        Some(other) => return Err(MigrationError::Unexpected(other.name())),
        None => return Err(MigrationError::Closed),
    }
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Frame>(4);
    let traffic = Arc::new(traffic);
    let t = traffic.clone();
    let writer_task = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            write_frame(&mut writer, &f, &t).await?;
        }
        use tokio::io::AsyncWriteExt;
        writer.flush().await?;
        Ok::<_, MigrationError>(writer)
    });
    let mut listed = 0;
    let mut first = 0;
    for info in &infos {
        let snapshot = {
            let (s, id) = (store.clone(), info.id);
            blocking(move || s.map_snapshot(id)).await?
        };
        listed += send_plan_snapshot(snapshot, &tx, first).await?;
        first += info.size.div_ceil(bs);
    }
    send(&tx, Message::RoundEnd { round: 0, last: true }).await?;
    drop(tx);
    let _writer = writer_task.await.map_err(|_| MigrationError::Closed)??;
    let mut wanted: Vec<Fingerprint> = Vec::new();
    let report = loop {
        match read_message(&mut reader, &traffic).await? {
            Some(Message::Want(fps)) => wanted.extend(fps),
            Some(Message::Plan(r)) => break r,
            Some(Message::Error(e)) => return Err(MigrationError::Refused(e.message)),
            Some(other) => return Err(MigrationError::Unexpected(other.name())),
            None => return Err(MigrationError::Closed),
        }
    };
    // What the missing blocks would cost on the wire: compress them here, as a migration
    // would, in batches of the same size through one link stream (DATA_STREAM), in the
    // record layout a migration agrees on with a destination of this version.
    let s = store.clone();
    let block_size = store.block_size() as usize;
    let compressed = blocking(move || {
        let mut total = 0u64;
        let mut stream = StreamEncoder::new(StreamId::Background, zstd_level).map_err(|e| MigrationError::Hook(e.to_string()))?;
        let layout = RecordLayout::Unnamed;
        for chunk in wanted.chunks((1 << 20) / (block_size + layout.block_overhead())) {
            let blocks = s.get_blocks(chunk)?;
            let records: Vec<Record> = chunk.iter().zip(blocks).filter_map(|(fp, b)| b.map(|d| Record::Block { fp: *fp, data: d.to_vec() })).collect();
            let mut raw = Vec::new();
            encode_records(&records, layout, &mut raw);
            // Frame header (5) + stream id (1) + raw length (4).
            total += (stream.encode(&raw, zstd_level).map_err(|e| MigrationError::Hook(e.to_string()))?.len() + 10) as u64;
        }
        Ok::<_, MigrationError>(total)
    })
    .await?;
    let fingerprint_bytes = traffic.report().total_bytes;
    let estimated = compressed + fingerprint_bytes;
    Ok(PlanReport {
        disk,
        destination: destination.to_string(),
        disk_bytes: infos.iter().map(|i| i.size).sum(),
        block_size: store.block_size(),
        allocated_blocks: listed,
        neighbour_hits: report.neighbour_hits,
        duplicates: report.duplicates,
        zero_blocks: report.zero_blocks,
        missing_blocks: report.wanted,
        missing_bytes: report.wanted * block_size as u64,
        missing_compressed_bytes: compressed,
        fingerprint_bytes,
        estimated_link_bytes: estimated,
        link_rate_bps,
        estimated_seconds: link_rate_bps.map(|r| estimated as f64 * 8.0 / r as f64),
    })
}
