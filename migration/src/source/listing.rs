//! Fingerprint listings: map snapshots and dirty rounds as FINGERPRINTS frames.

use std::sync::Arc;

use cas_store::{DiskId, Fingerprint, Store};

use super::*;
use crate::protocol::{Message, Run};
use crate::{blocking, MigrationError};

/// The next frame's worth of a map snapshot (read on the blocking pool; the snapshot moves
/// there and back).
pub(crate) async fn next_batch(mut snapshot: cas_store::MapSnapshot) -> Result<(Vec<(u64, Fingerprint)>, cas_store::MapSnapshot), MigrationError> {
    blocking(move || {
        let batch = snapshot.next_batch(FINGERPRINTS_PER_FRAME);
        batch.map(|b| (b, snapshot))
    })
    .await
}

/// Streams a map snapshot as FINGERPRINTS frames of consecutive-block runs. With `gaps`, the
/// blocks between mapped ones are listed as zero runs (a destination that already holds
/// part of the disk must clear blocks the source no longer has).
pub(crate) async fn send_snapshot(mut snapshot: cas_store::MapSnapshot, outbox: &Outbox, epoch: u64, gaps: bool) -> Result<u64, MigrationError> {
    let mut listed = 0u64;
    let mut next_block = 0u64;
    let blocks = snapshot.disk_size().div_ceil(u64::from(snapshot.block_size()));
    loop {
        let (batch, snap) = next_batch(snapshot).await?;
        snapshot = snap;
        if batch.is_empty() {
            if gaps && next_block < blocks {
                let runs = vec![Run::Zero { first: next_block, count: blocks - next_block }];
                outbox.push(epoch, &Message::Fingerprints { round: 0, runs }).await?;
            }
            return Ok(listed);
        }
        listed += batch.len() as u64;
        let mut runs = Vec::with_capacity(batch.len() / 8 + 2);
        for (block, fp) in batch {
            if gaps && block > next_block {
                runs.push(Run::Zero { first: next_block, count: block - next_block });
            }
            next_block = block + 1;
            match runs.last_mut() {
                Some(Run::Mapped { first, fps }) if *first + fps.len() as u64 == block => fps.push(fp),
                _ => runs.push(Run::Mapped { first: block, fps: vec![fp] }),
            }
        }
        outbox.push(epoch, &Message::Fingerprints { round: 0, runs }).await?;
    }
}

/// Lists the current content of dirty blocks (zero runs for blocks that read as zeros).
/// `switch_over`: the final round, inside the freeze (see [`Outbox::push_switch_over`]).
pub(crate) async fn send_dirty_round(
    store: &Arc<Store>,
    disk: DiskId,
    round: u32,
    blocks: &[u64],
    outbox: &Outbox,
    epoch: u64,
    switch_over: bool,
) -> Result<(), MigrationError> {
    for chunk in blocks.chunks(FINGERPRINTS_PER_FRAME) {
        let s = store.clone();
        let owned = chunk.to_vec();
        let fps = blocking(move || s.block_fingerprints(disk, &owned)).await?;
        let runs = runs_of(chunk.iter().copied().zip(fps));
        let msg = Message::Fingerprints { round, runs };
        if switch_over {
            outbox.push_switch_over(epoch, &msg).await?;
        } else {
            outbox.push(epoch, &msg).await?;
        }
    }
    Ok(())
}

/// Groups ascending (block, content) pairs into runs of consecutive blocks.
pub(crate) fn runs_of(entries: impl IntoIterator<Item = (u64, Option<Fingerprint>)>) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (block, fp) in entries {
        match (runs.last_mut(), fp) {
            (Some(Run::Mapped { first, fps }), Some(fp)) if *first + fps.len() as u64 == block => fps.push(fp),
            (Some(Run::Zero { first, count }), None) if *first + *count == block => *count += 1,
            (_, Some(fp)) => runs.push(Run::Mapped { first: block, fps: vec![fp] }),
            (_, None) => runs.push(Run::Zero { first: block, count: 1 }),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn runs_group_consecutive_blocks() {
        let fp = |b: u8| Some(Fingerprint([b; 16]));
        let runs = runs_of(vec![(1, fp(1)), (2, fp(2)), (4, fp(4)), (5, None), (6, None), (7, fp(7))]);
        assert_eq!(
            runs,
            vec![
                Run::Mapped { first: 1, fps: vec![fp(1).unwrap(), fp(2).unwrap()] },
                Run::Mapped { first: 4, fps: vec![fp(4).unwrap()] },
                Run::Zero { first: 5, count: 2 },
                Run::Mapped { first: 7, fps: vec![fp(7).unwrap()] },
            ]
        );
    }
}
