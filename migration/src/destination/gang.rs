//! Gangs: migrations of several disks into this server that move together.
//!
//! Each migration of a gang keeps its own connection, rounds, switch-over, cancel and resume;
//! what they share is which of them asked its source for each content that more than one of
//! them lacks. The first to list a missing content asks its own source for it (it *owns* it);
//! another that lists it while it is on its way *borrows* it: it records the blocks that wait
//! for it and asks nobody. When the owner's copy is stored, each borrower maps it (a map
//! entry, no copy). When an owner lets go of content without storing it (its source said
//! GONE, or the migration failed or was cancelled), its borrowers ask their own sources. A
//! borrower whose reader needs the content now (post-copy) fetches it from its own source at
//! once rather than wait for another migration's background order.
//!
//! So each distinct missing content crosses once for the whole gang, and one failing or
//! cancelled migration costs the others only the content it had not delivered yet.
//!
//! After a restart of this server the gang's claims are gone: every restored migration asks
//! its own source for what it still lacks (correct, at worst some content crosses twice).
//!
//! Lock order: a migration's pending lock, then the gang's; never the reverse.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cas_store::Fingerprint;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::{blocking, MigrationError};

use super::*;

/// How often a migration looks at its inbox even if nobody woke it (a safety net: owners
/// wake their borrowers whenever they store or let go of content).
const BORROW_RECHECK: Duration = Duration::from_secs(1);

/// The migrations of one gang into this server.
#[derive(Debug, Default)]
pub(crate) struct Gang {
    inner: Mutex<GangInner>,
    /// Members between SWITCH and SWITCHED here: the others apply no background data
    /// meanwhile, whose CPU and writes would lengthen the paused VM's downtime.
    switching: AtomicUsize,
    switched: Notify,
}

/// A member's switch-over in progress (see [`GangMember::hold_for_switch`]).
#[derive(Debug)]
pub(crate) struct GangSwitch(Arc<Gang>);

impl Drop for GangSwitch {
    fn drop(&mut self) {
        self.0.switching.fetch_sub(1, Ordering::SeqCst);
        self.0.switched.notify_waiters();
    }
}

/// How long background data of one member waits at most for the others' switch-overs (one
/// takes milliseconds; a stuck one must not stall the gang).
const MAX_SWITCH_YIELD: Duration = Duration::from_millis(200);

#[derive(Debug, Default)]
struct GangInner {
    /// Content on its way -> the migration whose source was asked for it.
    owners: HashMap<Fingerprint, Arc<str>>,
    /// Content on its way -> the other migrations that wait for it.
    borrowers: HashMap<Fingerprint, Vec<Arc<str>>>,
    members: HashMap<Arc<str>, Member>,
}

#[derive(Debug, Default)]
struct Member {
    wake: Arc<Notify>,
    /// Content it borrowed whose owner has stored it or let go of it since it last looked.
    inbox: Vec<Fingerprint>,
}

impl GangInner {
    /// The owner of `fp` is done with it (stored, or gave up): its borrowers look at it.
    fn hand_over(&mut self, fp: &Fingerprint) {
        for b in self.borrowers.remove(fp).unwrap_or_default() {
            if let Some(m) = self.members.get_mut(&b) {
                m.inbox.push(*fp);
                m.wake.notify_one();
            }
        }
    }
}

impl Gang {
    fn join(&self, id: &Arc<str>) -> Arc<Notify> {
        self.inner.lock().members.entry(id.clone()).or_default().wake.clone()
    }

    /// Removes a member; what it owned goes to its borrowers. Returns whether the gang is
    /// empty now.
    fn leave(&self, id: &str) -> bool {
        let mut g = self.inner.lock();
        g.members.remove(id);
        let owned: Vec<Fingerprint> = g.owners.iter().filter(|(_, owner)| &***owner == id).map(|(fp, _)| *fp).collect();
        for fp in &owned {
            g.owners.remove(fp);
            g.hand_over(fp);
        }
        g.members.is_empty()
    }

    /// Claims `fp` for `id` unless another member already asked for it (then `id` borrows it
    /// and hears when it is stored or let go); true if `id` owns it.
    fn claim(&self, fp: Fingerprint, id: &Arc<str>) -> bool {
        let mut g = self.inner.lock();
        let owner = g.owners.entry(fp).or_insert_with(|| id.clone()).clone();
        if *owner == **id {
            return true;
        }
        let waiting = g.borrowers.entry(fp).or_default();
        if !waiting.iter().any(|b| **b == **id) {
            waiting.push(id.clone());
        }
        false
    }

    /// `id` stored `fps` or let go of them: its claims on them end and their borrowers look.
    fn release(&self, fps: &[Fingerprint], id: &str) {
        let mut g = self.inner.lock();
        for fp in fps {
            if g.owners.get(fp).is_some_and(|owner| &**owner == id) {
                g.owners.remove(fp);
                g.hand_over(fp);
            }
        }
    }

    fn take_inbox(&self, id: &str) -> Vec<Fingerprint> {
        self.inner.lock().members.get_mut(id).map(|m| std::mem::take(&mut m.inbox)).unwrap_or_default()
    }
}

/// A migration's place in its gang.
#[derive(Debug)]
pub(crate) struct GangMember {
    pub(crate) name: String,
    pub(crate) gang: Arc<Gang>,
    id: Arc<str>,
    wake: Arc<Notify>,
}

impl GangMember {
    /// Joins `id` to the gang `name` among `gangs` (made on its first member).
    pub(crate) fn join(gangs: &Mutex<HashMap<String, Arc<Gang>>>, name: &str, id: &str) -> GangMember {
        let gang = gangs.lock().entry(name.to_string()).or_default().clone();
        let id: Arc<str> = Arc::from(id);
        let wake = gang.join(&id);
        GangMember { name: name.to_string(), gang, id, wake }
    }

    /// Leaves the gang (the migration ended): what it owned goes to the others.
    pub(crate) fn leave(&self, gangs: &Mutex<HashMap<String, Arc<Gang>>>) {
        let mut all = gangs.lock();
        if self.gang.leave(&self.id) && all.get(&self.name).is_some_and(|g| Arc::ptr_eq(g, &self.gang)) {
            all.remove(&self.name);
        }
    }

    /// Claims `fp`: true if this migration must ask its own source for it.
    pub(crate) fn claim(&self, fp: Fingerprint) -> bool {
        self.gang.claim(fp, &self.id)
    }

    /// This migration stored `fps` or let go of them.
    pub(crate) fn release(&self, fps: &[Fingerprint]) {
        self.gang.release(fps, &self.id)
    }

    /// This migration is switching over until the guard is dropped: the others hold their
    /// background data (see [`GangMember::yield_to_switch`]).
    pub(crate) fn hold_for_switch(&self) -> GangSwitch {
        self.gang.switching.fetch_add(1, Ordering::SeqCst);
        GangSwitch(self.gang.clone())
    }

    /// Waits while another member switches over (at most [`MAX_SWITCH_YIELD`]), before
    /// applying background data. False: it stopped waiting for a switch-over still going.
    pub(crate) async fn yield_to_switch(&self) -> bool {
        let deadline = tokio::time::Instant::now() + MAX_SWITCH_YIELD;
        loop {
            let switched = self.gang.switched.notified();
            if self.gang.switching.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, switched).await.is_err() {
                return false;
            }
        }
    }
}

/// Records that `fp` is missing and must come: from this migration's source (it joins
/// `want`), or, in a gang where another migration already asked for it, from that one.
pub(crate) fn ask_for(inc: &Incoming, p: &mut Pending, fp: Fingerprint, want: &mut Vec<Fingerprint>) {
    if p.wanted.contains(&fp) || p.borrowed.contains(&fp) {
        return;
    }
    if let Some(member) = &inc.gang {
        if !member.claim(fp) {
            p.borrowed.insert(fp);
            return;
        }
    }
    p.wanted.insert(fp);
    p.report.wanted += 1;
    want.push(fp);
}

/// Maps borrowed content that its owner has stored, and takes back (asks its own source
/// for) content whose owner let go of it. Returns what to ask for. Looks only at what the
/// owners handed over since the last call, so its cost follows the arrivals, not the size
/// of what is borrowed.
pub(crate) fn settle_borrowed(inc: &Incoming) -> Result<Vec<Fingerprint>, MigrationError> {
    let Some(member) = &inc.gang else {
        return Ok(Vec::new());
    };
    let mut handed = member.gang.take_inbox(&member.id);
    if handed.is_empty() {
        return Ok(Vec::new());
    }
    {
        let p = inc.pending.lock();
        handed.retain(|fp| p.borrowed.contains(fp));
    }
    // The owner hands content over only after its copy is stored: what is not in the store
    // now is not coming from it.
    let present = inc.store.has_many(&handed)?;
    let mut want = Vec::new();
    let mut p = inc.pending.lock();
    let mut entries: Vec<(u64, Fingerprint)> = Vec::new();
    for (fp, present) in handed.into_iter().zip(present) {
        if !p.borrowed.remove(&fp) {
            continue;
        }
        if !p.waiting.get(&fp).is_some_and(|blocks| blocks.iter().any(|b| p.by_block.get(b) == Some(&fp))) {
            // Later rounds listed other content for every block that waited for it.
            p.waiting.remove(&fp);
            continue;
        }
        if present {
            let blocks = p.waiting.remove(&fp).unwrap_or_default();
            entries.extend(blocks.into_iter().filter(|b| p.by_block.get(b) == Some(&fp)).map(|b| (b, fp)));
            p.received.insert(fp);
            p.report.gang_shared += 1;
        } else {
            ask_for(inc, &mut p, fp, &mut want);
        }
    }
    if !entries.is_empty() {
        // Mapped with the pending lock held, as arrivals are written: a reader waits for the
        // lock rather than seeing a block neither missing nor mapped.
        let applied = inc.store.map_existing(inc.disk, &entries)?;
        let mut done = Vec::with_capacity(entries.len());
        for ((block, fp), ok) in entries.into_iter().zip(applied) {
            if ok {
                p.by_block.remove(&block);
                done.push(block);
            } else {
                // Deleted again between the lookup and the mapping: ask for it.
                p.waiting.entry(fp).or_default().push(block);
                ask_for(inc, &mut p, fp, &mut want);
            }
        }
        if let Some(j) = inc.journal.lock().as_mut() {
            j.note_removed(&done);
        }
    }
    Ok(want)
}

/// Runs beside a gang member's connections for as long as the migration lives: settles what
/// it borrowed whenever another member stores or lets go of content.
pub(crate) fn spawn_borrow_settler(session: &Arc<Session>, hooks: Arc<dyn DestHooks>) {
    let Some(member) = &session.incoming.gang else {
        return;
    };
    let (session, wake) = (session.clone(), member.wake.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(BORROW_RECHECK) => {}
            }
            if session.ended.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let inc = session.incoming.clone();
            match blocking(move || settle_borrowed(&inc)).await {
                Ok(want) => {
                    let _ = session.send_wants(&want);
                    session.incoming.arrived.notify_all();
                    if let Err(e) = report_progress(&session, &hooks) {
                        tracing::debug!(error = %e, "gang progress not reported (the link is down)");
                    }
                }
                Err(e) => tracing::warn!(id = %session.hello.migration_id, error = %e, "cannot settle content borrowed from the gang"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn background_data_waits_while_another_member_switches_over() {
        let gangs = Mutex::new(HashMap::new());
        let (switching, other) = (GangMember::join(&gangs, "g", "a"), GangMember::join(&gangs, "g", "b"));
        assert!(other.yield_to_switch().await, "no switch-over: no wait");

        let hold = switching.hold_for_switch();
        let waiting = tokio::spawn(async move { other.yield_to_switch().await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiting.is_finished(), "background data went during a switch-over");
        drop(hold);
        assert!(waiting.await.unwrap(), "released by the end of the switch-over, not by the time limit");
    }

    #[tokio::test]
    async fn a_stuck_switch_over_holds_the_others_for_a_bounded_time() {
        let gangs = Mutex::new(HashMap::new());
        let (switching, other) = (GangMember::join(&gangs, "g", "a"), GangMember::join(&gangs, "g", "b"));
        let _hold = switching.hold_for_switch();
        let start = tokio::time::Instant::now();
        assert!(!other.yield_to_switch().await, "gave up on the stuck switch-over");
        assert!(start.elapsed() >= MAX_SWITCH_YIELD);
    }
}
