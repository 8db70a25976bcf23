//! Plan mode at the destination: what a migration would need, changing nothing.

use std::collections::HashSet;
use std::sync::Arc;

use cas_store::{Fingerprint, Store};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::protocol::{DestReport, Hello, Message, Run};
use crate::source::MigrationStatus;
use crate::wire::read_message;
use crate::{blocking, MigrationError};

/// Plan mode: count what the listed fingerprints would need, and say which are missing.
pub(crate) async fn plan<S>(store: Arc<Store>, mut stream: S, hello: &Hello, status: &MigrationStatus) -> Result<(), MigrationError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut report = DestReport::default();
    let mut seen: HashSet<Fingerprint> = HashSet::new();
    loop {
        match read_message(&mut stream, &status.traffic).await? {
            Some(Message::Fingerprints { runs, .. }) => {
                let fps = Run::fingerprints(runs);
                report.blocks_listed += fps.len() as u64;
                let s = store.clone();
                let lookup = fps.clone();
                let present = blocking(move || Ok::<_, MigrationError>(s.has_many(&lookup)?)).await?;
                let mut want = Vec::new();
                for (fp, have) in fps.into_iter().zip(present) {
                    if have {
                        report.neighbour_hits += 1;
                    } else if !seen.insert(fp) {
                        report.duplicates += 1;
                    } else {
                        report.wanted += 1;
                        want.push(fp);
                    }
                }
                if !want.is_empty() {
                    crate::wire::write_message(&mut stream, &Message::Want(want), &status.traffic).await?;
                }
            }
            Some(Message::RoundEnd { .. }) => {
                let blocks = hello.size.div_ceil(u64::from(hello.block_size));
                report.zero_blocks = blocks.saturating_sub(report.blocks_listed);
                crate::wire::write_message(&mut stream, &Message::Plan(report), &status.traffic).await?;
                let _ = stream.shutdown().await;
                return Ok(());
            }
            Some(other) => return Err(MigrationError::Unexpected(other.name())),
            None => return Err(MigrationError::Closed),
        }
    }
}
