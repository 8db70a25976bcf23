//! The scheduling class of a migration's bulk threads.
//!
//! Both ends of a migration share their machine's cores with the guests' I/O and with the
//! control path of every other migration. A switch-over's SWITCH and SWITCHED are a few bytes
//! each, but a task that has to send or read one waits for a core like any other thread: on
//! two cores busy compressing other disks' data, that wait was the larger part of a gang
//! member's downtime (a few milliseconds between one side queuing SWITCHED and the other
//! reading it, with nothing in the links). Bulk work therefore runs in Linux's `SCHED_IDLE`
//! class: it gets every cycle nobody else wants, and a thread of the normal class that wakes
//! up preempts it at once.
//!
//! Only work that holds no lock others wait for, beyond a moment, runs in that class: a thread
//! of it can wait long for a core while normal threads are busy, and a lock held meanwhile
//! would make them wait for it in turn (priority inversion). So the source's compressor runs
//! in it for its whole life, and the destination's decompression and hashing of a frame do,
//! but not the store writes that follow (they hold the disk's pending lock, which readers wait
//! for).

/// Puts the calling thread in the `SCHED_IDLE` class for as long as the guard lives; the
/// normal class comes back when it drops. Where the class cannot be changed (another OS, a
/// sandbox that forbids it), nothing changes.
#[must_use]
pub(crate) struct BulkClass {
    changed: bool,
}

impl BulkClass {
    /// For a stretch of work on a thread that goes on to other work (tokio's blocking pool).
    /// Entered only where the thread can come back: leaving `SCHED_IDLE` needs `CAP_SYS_NICE`
    /// or room in `RLIMIT_NICE`, and a pool thread left in that class would later run work
    /// that holds locks (the priority inversion above).
    pub(crate) fn enter() -> BulkClass {
        BulkClass { changed: can_come_back() && set_policy(Policy::Idle) }
    }

    /// For a thread that does bulk work and nothing else until it ends (the source's
    /// compressor): it never needs to come back.
    pub(crate) fn for_thread_life() -> BulkClass {
        set_policy(Policy::Idle);
        BulkClass { changed: false }
    }
}

impl Drop for BulkClass {
    fn drop(&mut self) {
        if self.changed && !set_policy(Policy::Normal) {
            tracing::warn!("cannot move a migration thread back to the normal scheduling class");
        }
    }
}

enum Policy {
    Idle,
    Normal,
}

#[cfg(target_os = "linux")]
fn set_policy(policy: Policy) -> bool {
    let (policy, name) = match policy {
        Policy::Idle => (libc::SCHED_IDLE, "SCHED_IDLE"),
        Policy::Normal => (libc::SCHED_OTHER, "SCHED_OTHER"),
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` lives across the call.
    let r = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if r != 0 {
        tracing::debug!(policy = name, error = %std::io::Error::last_os_error(), "cannot change a migration thread's scheduling class");
    }
    r == 0
}

/// Whether this process may move a thread from `SCHED_IDLE` back to the normal class: root
/// (which holds `CAP_SYS_NICE` unless a sandbox took it), or an `RLIMIT_NICE` that allows nice
/// 0 (20 - 0). Errs on the side of not entering.
#[cfg(target_os = "linux")]
fn can_come_back() -> bool {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls; `limit` lives across the call.
    let (root, got) = unsafe { (libc::geteuid() == 0, libc::getrlimit(libc::RLIMIT_NICE, &mut limit) == 0) };
    root || (got && limit.rlim_cur >= 20)
}

#[cfg(not(target_os = "linux"))]
fn set_policy(_policy: Policy) -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
fn can_come_back() -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn current_policy() -> i32 {
        // SAFETY: pid 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn a_bulk_thread_runs_in_the_idle_class_and_comes_back() {
        std::thread::spawn(|| {
            assert_eq!(current_policy(), libc::SCHED_OTHER);
            let guard = BulkClass::enter();
            if guard.changed {
                assert_eq!(current_policy(), libc::SCHED_IDLE);
            }
            drop(guard);
            assert_eq!(current_policy(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }
}
