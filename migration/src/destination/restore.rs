//! After a restart: the incoming migrations the records name, parked (before the
//! switch-over) or serving their disks with what is still missing (after it).

use std::collections::HashSet;
use std::sync::Arc;

use crate::protocol::Hello;
use crate::report::{MigrationReport, Phase};
use crate::source::MigrationStatus;
use crate::state::{MigrationRecord, Stage};
use crate::{blocking, MigrationError};

use super::*;

impl Destination {
    /// After a restart: parks every migration a record names, and deletes partial disks no
    /// record explains. Call before exporting the store's disks.
    pub async fn restore(self: &Arc<Self>) -> Result<(), MigrationError> {
        let state = self.state.clone();
        let records = blocking(move || state.load()).await?;
        let mut known: HashSet<String> = HashSet::new();
        for record in records.into_iter().filter(|r| r.role == "destination") {
            let Some(hello) = record.hello.clone() else {
                continue;
            };
            known.insert(incoming_name(&hello.disk));
            match self.restore_one(&record, hello).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(id = %record.id, error = %e, "cannot restore an incoming migration");
                    let (state, id) = (self.state.clone(), record.id.clone());
                    let _ = blocking(move || forget(state.as_ref(), &id)).await;
                }
            }
        }
        let s = self.store.clone();
        let disks = blocking(move || Ok::<_, MigrationError>(s.list_disks()?)).await?;
        for disk in disks {
            if disk.name.ends_with(".incoming") && !known.contains(&disk.name) {
                tracing::warn!(disk = %disk.name, "removing a partial disk no migration record explains");
                let s = self.store.clone();
                blocking(move || Ok::<_, MigrationError>(s.delete_disk(&disk.name)?)).await?;
            }
        }
        Ok(())
    }

    pub(crate) async fn restore_one(self: &Arc<Self>, record: &MigrationRecord, hello: Hello) -> Result<(), MigrationError> {
        // The committed list of missing blocks is the switch-over's mark; the record that
        // says so is written after the source heard SWITCHED (see `journal.rs`).
        let switched = record.stage == Stage::Switched || {
            let (state, id) = (self.state.clone(), record.id.clone());
            blocking(move || PendingJournal::committed(state.as_ref(), &id)).await?
        };
        if switched && record.stage != Stage::Switched {
            tracing::warn!(id = %record.id, disk = %hello.disk, "the switch-over was committed but not yet recorded when the server stopped; recording it now");
            let record = MigrationRecord { stage: Stage::Switched, ..record.clone() };
            let state = self.state.clone();
            blocking(move || state.save(&record)).await?;
        }
        let name = if switched { hello.disk.clone() } else { incoming_name(&hello.disk) };
        if switched {
            // Stopped between committing the switch-over and renaming the disk: rename it now.
            let s = self.store.clone();
            let (temp, real) = (incoming_name(&hello.disk), hello.disk.clone());
            blocking(move || {
                if s.disk(&real).is_err() && s.disk(&temp).is_ok() {
                    tracing::warn!(disk = %real, "finishing a switch-over that a restart interrupted");
                    s.rename_disk(&temp, &real)?;
                }
                Ok::<_, MigrationError>(())
            })
            .await?;
        }
        let s = self.store.clone();
        let n = name.clone();
        let info = match blocking(move || Ok::<_, MigrationError>(s.disk(&n)?)).await {
            Ok(i) => i,
            Err(_) => {
                tracing::warn!(id = %record.id, disk = %name, "a migration record names a disk that is gone; dropping the record");
                let (state, id) = (self.state.clone(), record.id.clone());
                blocking(move || state.remove(&id)).await?;
                return Ok(());
            }
        };
        let status = MigrationStatus::new(MigrationReport::new(&record.id, &hello.disk, "destination", &record.peer));
        status.update(|r| {
            r.disk_bytes = hello.size;
            r.block_size = hello.block_size;
            r.cancellable = !switched;
            r.phase = if switched { Phase::PostCopy } else { Phase::PreCopy };
        });
        let mut pending = Pending::new(if switched { DiskPhase::PostCopy } else { DiskPhase::Standby });
        let mut proto = Proto { needs_rebuild: !switched, ..Default::default() };
        if switched {
            let (state, id) = (self.state.clone(), record.id.clone());
            let (entries, processed) = blocking(move || PendingJournal::load_from(state.as_ref(), &id)).await?;
            proto.processed = processed;
            proto.processed_at_switch = processed;
            // A block whose content is the one it waited for arrived (its journal entry was
            // lost with the crash); the rest is still missing.
            let blocks: Vec<u64> = entries.iter().map(|e| e.0).collect();
            let s = self.store.clone();
            let id = info.id;
            let current = blocking(move || Ok::<_, MigrationError>(s.block_fingerprints(id, &blocks)?)).await?;
            for ((block, fp), now) in entries.into_iter().zip(current) {
                if now == Some(fp) {
                    continue;
                }
                pending.by_block.insert(block, fp);
                pending.waiting.entry(fp).or_default().push(block);
                pending.wanted.insert(fp);
            }
        }
        status.interrupt("parked after a restart; waiting for the source to reconnect");
        let journal = if switched {
            let (state, id) = (self.state.clone(), record.id.clone());
            blocking(move || PendingJournal::open(state.as_ref(), &id)).await?
        } else {
            None
        };
        let prepared = if switched { None } else { self.prepare_journal(&record.id).await };
        let session = self.new_session(hello.clone(), info.id, status, pending, proto, journal, prepared)?;
        if switched {
            let missing = session.incoming.pending.lock().by_block.len();
            tracing::warn!(id = %record.id, disk = %hello.disk, missing, "serving a migrated disk whose post-copy was interrupted by a restart; missing blocks wait for the source");
            self.hooks.switched(&hello.disk);
            if session.incoming.pending.lock().by_block.is_empty() {
                self.finish(&session, Ok(()));
                return Ok(());
            }
        } else {
            tracing::warn!(id = %record.id, disk = %hello.disk, "parked an incoming migration after a restart; the source resumes it");
            self.park_timer(&session);
        }
        Ok(())
    }
}
