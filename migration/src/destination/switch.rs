//! The switch-over of an incoming migration and the reports of its progress: what a
//! connection does once the source says the VM has paused, and once nothing is missing.

use std::sync::Arc;

use cas_store::Fingerprint;

use crate::protocol::Message;
use crate::report::Phase;
use crate::state::{MigrationRecord, Stage, StateStore};
use crate::wire::Frame;
use crate::{blocking, blocking_now, MigrationError};

use super::*;

/// Reports a session's finished rounds, and completion after the switch-over, once nothing
/// it waits for is missing (from its own source or from its gang).
pub(crate) fn report_progress(session: &Arc<Session>, hooks: &Arc<dyn DestHooks>) -> Result<(), MigrationError> {
    let send = |msg: Message| session.out.send(Frame::new(&msg)).map_err(|_| MigrationError::Closed);
    let (idle, switched, report) = {
        let p = session.incoming.pending.lock();
        let idle = p.wanted.is_empty() && p.borrowed.is_empty() && session.incoming.backlog.is_empty();
        (idle, p.phase.has_switched(), p.report.clone())
    };
    if !idle {
        return Ok(());
    }
    let (rounds, complete_now) = {
        let mut proto = session.proto.lock();
        let rounds = std::mem::take(&mut proto.ended_rounds);
        if let Some(&r) = rounds.last() {
            proto.last_done = Some(r);
        }
        let complete_now = switched && !proto.renaming && !proto.completed;
        if complete_now {
            proto.completed = true;
        }
        (rounds, complete_now)
    };
    for round in rounds {
        send(Message::RoundDone { round })?;
    }
    if complete_now {
        // COMPLETE lets the source delete its copy: every block must first survive a power
        // loss here too, not only a crash of this process (the store's writes are in the page
        // cache until a flush). The flush runs off the async workers.
        let (session, hooks) = (session.clone(), hooks.clone());
        tokio::spawn(async move {
            let store = session.incoming.store.clone();
            if let Err(e) = blocking(move || store.flush()).await {
                tracing::error!(disk = %session.hello.disk, error = %e, "cannot flush the migrated disk; completion waits for a later try");
                session.proto.lock().completed = false;
                return;
            }
            hooks.complete(&session.hello.disk);
            tracing::info!(disk = %session.hello.disk, "every block is local");
            let _ = session.out.send(Frame::new(&Message::Complete(report)));
        });
    }
    Ok(())
}

/// The switch-over: writes down what is still missing, renames the disk to its real name and
/// serves it as post-copy from here (see [`Connection::apply_switch`]).
pub(crate) async fn switch_over(session: &Arc<Session>, hooks: &Arc<dyn DestHooks>, state_store: &Arc<dyn StateStore>) -> Result<(), MigrationError> {
    let id = session.hello.migration_id.clone();
    let started = std::time::Instant::now();
    // Nothing is served from the disk before this point; everything listed as here is
    // mapped before anything is (normally a no-op: a round is done only once it is).
    drain_mapping(&session.incoming).await?;
    let drained = started.elapsed();
    let switching = session.incoming.gang.as_ref().map(GangMember::hold_for_switch);
    // What is still missing is written down before the disk can be written: after a
    // restart, it tells blocks still to come from blocks the guest has written since.
    let processed = session.proto.lock().processed + 1;
    let entries: Vec<(u64, Fingerprint)> = session.incoming.pending.lock().by_block.iter().map(|(b, fp)| (*b, *fp)).collect();
    let state = state_store.clone();
    let prepared = session.incoming.prepared_journal.lock().take();
    let listed = started.elapsed();
    let journal = {
        let id = id.clone();
        blocking_now(move || {
            let writing = std::time::Instant::now();
            let journal = PendingJournal::commit(state.as_ref(), &id, prepared, &entries, processed)?;
            Ok::<_, MigrationError>((journal, writing.elapsed()))
        })
        .await?
    };
    // The write itself, and the rest of `journal_ms`: handing the worker's other tasks over.
    let (journal, journal_write) = journal;
    *session.incoming.journal.lock() = journal;
    let journal_done = started.elapsed();
    // From here a restart of this process serves the disk as switched over: the list just
    // written is the mark, and `restore_one` finishes the rename. What makes the mark survive
    // a power loss (syncs of the store and the list: a cache flush of the device, 0.3-4 ms
    // here and more under a gang's writes), the rename (a catalogue write that can wait
    // behind the engine's other writers) and the record are done after SWITCHED has gone,
    // outside the downtime (see `journal.rs`). Until the rename, the disk is served under its
    // real name through its export (by id); the store still calls it by its temporary name,
    // so completion waits for the rename.
    session.proto.lock().renaming = true;
    let (report, deferred) = {
        let inc = &session.incoming;
        let mut p = inc.pending.lock();
        // Requests the standby export holds continue as post-copy requests from here.
        p.phase = DiskPhase::PostCopy;
        // What deferred rounds left is asked for now, once, for the blocks that still
        // need it (a later round may have listed other content for them since).
        let deferred: Vec<Fingerprint> = std::mem::take(&mut p.deferred)
            .into_iter()
            .filter(|fp| p.waiting.get(fp).is_some_and(|blocks| blocks.iter().any(|b| p.by_block.get(b) == Some(fp))))
            .collect();
        let mut ask = Vec::with_capacity(deferred.len());
        for fp in deferred {
            ask_for(inc, &mut p, fp, &mut ask);
        }
        (p.report.clone(), ask)
    };
    session.incoming.arrived.notify_all();
    session.proto.lock().processed_at_switch = processed;
    hooks.switched(&session.hello.disk);
    let at = session.status.since_start();
    session.status.update(|r| {
        r.phase = Phase::PostCopy;
        r.switch_seconds = Some(at);
        r.cancellable = false;
    });
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    tracing::info!(
        disk = %session.hello.disk,
        missing = session.incoming.pending.lock().by_block.len(),
        drain_ms = ms(drained),
        list_ms = ms(listed - drained),
        journal_ms = ms(journal_done - listed),
        journal_write_ms = ms(journal_write),
        total_ms = ms(started.elapsed()),
        "switched over: serving the disk here"
    );
    session.out.send(Frame::new(&Message::Switched(report))).map_err(|_| MigrationError::Closed)?;
    session.send_wants(&deferred)?;
    // The gang's other members may send their background data again.
    drop(switching);
    let syncing = std::time::Instant::now();
    let inc = session.incoming.clone();
    let synced = blocking(move || super::journal::sync_journal(&inc.journal, &inc.store)).await;
    let renaming = std::time::Instant::now();
    // The rename only once the list is durable: a rename that survived a power loss the list
    // did not would leave a restart unable to find the disk it restores as pre-switch-over.
    let renamed = match synced {
        Err(e) => {
            // Flushes of the disk retry the sync and fail while it fails.
            tracing::error!(disk = %session.hello.disk, error = %e, "cannot sync the switch-over's journal; a restart of this server finishes the switch-over");
            false
        }
        Ok(_) => {
            let s = session.incoming.store.clone();
            let (temp, name) = (incoming_name(&session.hello.disk), session.hello.disk.clone());
            match blocking(move || Ok::<_, MigrationError>(s.rename_disk(&temp, &name)?)).await {
                Ok(()) => {
                    tracing::debug!(
                        disk = %session.hello.disk,
                        sync_ms = ms(renaming - syncing),
                        rename_ms = ms(renaming.elapsed()),
                        "switch-over made durable; disk renamed to its real name"
                    );
                    true
                }
                // The disk is still served (by id); a restart finishes the rename from the journal.
                Err(e) => {
                    tracing::error!(disk = %session.hello.disk, error = %e, "cannot rename the switched disk; a restart of this server finishes it");
                    false
                }
            }
        }
    };
    if !renamed {
        // No record either: a record that says switched over must never outlive a list lost
        // with the page cache (a restart would find no list to restore).
        return Ok(());
    }
    let record = MigrationRecord {
        id: id.clone(),
        role: "destination".into(),
        disk: session.hello.disk.clone(),
        peer: session.status.report().peer,
        stage: Stage::Switched,
        config: None,
        hello: Some(session.hello.clone()),
    };
    let state = state_store.clone();
    let recording = std::time::Instant::now();
    // A failure here loses nothing: the committed journal already marks the switch-over.
    match blocking(move || state.save(&record)).await {
        Ok(()) => tracing::debug!(disk = %session.hello.disk, record_ms = recording.elapsed().as_secs_f64() * 1000.0, "switch-over recorded"),
        Err(e) => tracing::warn!(disk = %session.hello.disk, error = %e, "cannot record the switch-over; the journal marks it"),
    }
    // Completion held back for the rename goes now if every block arrived meanwhile (after
    // a failed sync or rename it waits for the restart that finishes them).
    session.proto.lock().renaming = false;
    report_progress(session, hooks)
}
