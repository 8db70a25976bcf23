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
//!
//! The threads of tokio's blocking pool that run a migration's other work (store reads and
//! writes, journal syncs, records) move to `SCHED_BATCH` ([`as_pool`]): the same share of the
//! cores as the normal class, so no inversion, but such a thread never preempts another when
//! it wakes up, and the async workers get short time slices ([`as_worker`]). A
//! trace of a gang's switch-over (`perf sched`) showed why that matters: the destination's
//! async worker queued SWITCHED, handed the journal's sync to the pool, and the pool thread it
//! woke took its core at once and kept it 2.7 ms, with SWITCHED still unwritten behind it.
//!
//! During a switch-over itself the async workers go further, into `SCHED_FIFO`, for the
//! switch-over's milliseconds only (the `switch` module).

mod switch;
mod sys;

use switch::RUNTIME;
pub use switch::{on_switch_thread, urgent, RuntimeThreads, Urgent};
use sys::*;

/// Puts the calling thread in a bulk scheduling class for as long as the guard lives; the
/// class it was in comes back when it drops. Where the class cannot be changed (another OS, a
/// sandbox that forbids it), nothing changes.
#[must_use]
pub(crate) struct BulkClass {
    /// The policy to restore, if this guard changed it.
    previous: Option<libc::c_int>,
}

impl BulkClass {
    /// `SCHED_IDLE`, for a stretch of work on a thread that goes on to other work (tokio's
    /// blocking pool). Entered only where the thread can come back: leaving `SCHED_IDLE` needs
    /// `CAP_SYS_NICE` or room in `RLIMIT_NICE`, and a pool thread left in that class would
    /// later run work that holds locks (the priority inversion above).
    pub(crate) fn enter() -> BulkClass {
        if !can_come_back() {
            return BulkClass { previous: None };
        }
        Self::change(IDLE)
    }

    /// `SCHED_IDLE` for a thread that does bulk work and nothing else until it ends (the
    /// source's compressor): it never needs to come back.
    pub(crate) fn for_thread_life() -> BulkClass {
        set_policy(IDLE);
        BulkClass { previous: None }
    }

    fn change(to: libc::c_int) -> BulkClass {
        let now = policy();
        if now == Some(to) {
            return BulkClass { previous: None };
        }
        BulkClass { previous: now.filter(|_| set_policy(to)) }
    }
}

impl Drop for BulkClass {
    fn drop(&mut self) {
        if let Some(previous) = self.previous {
            if !set_policy(previous) {
                tracing::warn!(policy = previous, "cannot move a migration thread back to its scheduling class");
            }
        }
    }
}

/// The time slice asked for by the async worker threads, which carry the control path.
const SHORT_SLICE: std::time::Duration = std::time::Duration::from_micros(100);

/// What a runtime thread does now, as far as its scheduling goes. tokio moves threads between
/// the two roles (`block_in_place` hands a worker's queue over to a pool thread), so each role
/// is asserted where it starts: a worker's at each unpark, a pool thread's at each migration
/// job; the syscalls happen only when the role changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThreadRole {
    Unknown,
    /// Normal class, the kernel's shortest slice; `SCHED_FIFO` while a switch-over is under
    /// way (the `switch` module).
    Worker,
    /// `SCHED_BATCH`, the default slice.
    Pool,
}

thread_local! {
    static ROLE: std::cell::Cell<ThreadRole> = const { std::cell::Cell::new(ThreadRole::Unknown) };
}

fn take_role(role: ThreadRole) {
    ROLE.with(|now| {
        if now.get() == role {
            return;
        }
        now.set(role);
        let runtime = RUNTIME.with(|r| r.borrow().clone());
        match runtime {
            Some(threads) => threads.took(role),
            // A thread some other code put in another class (real-time, idle) is left there.
            None if matches!(policy(), Some(OTHER) | Some(BATCH)) => {
                apply_role(0, role, false);
            }
            None => {}
        }
    });
}

/// Sets thread `tid`'s (0: the calling thread's) attributes for `role`; `urgent`: a
/// switch-over is under way, and workers run in `SCHED_FIFO`.
fn apply_role(tid: libc::pid_t, role: ThreadRole, urgent: bool) -> bool {
    match role {
        ThreadRole::Worker if urgent => set_attr_of(tid, FIFO, None, None),
        ThreadRole::Worker => set_attr_of(tid, OTHER, Some(SHORT_SLICE), Some(process_nice())),
        // Lower only where the thread can come back when tokio makes it a worker again.
        ThreadRole::Pool => set_attr_of(tid, BATCH, None, can_come_back().then(|| (process_nice() + POOL_NICE).min(19))),
        ThreadRole::Unknown => true,
    }
}

/// How much nicer than the process the blocking pool's threads run. A worker woken while a
/// pool thread holds the core preempts it only if the kernel (EEVDF) finds the worker
/// eligible, that is owed time; workers run often, so at equal weights they often were not,
/// and a trace showed the destination's worker that reads SWITCH waiting 2.5 ms behind two
/// pool threads writing another member's blocks. At +5 a pool thread weighs a third of a
/// worker: it still gets its share of a contended core (no starving of the store writes that
/// hold locks), but the worker is owed time far sooner.
const POOL_NICE: libc::c_int = 5;

/// For a server's async worker threads (tokio's `on_thread_unpark`): the normal class with the
/// kernel's shortest time slice (Linux 6.12's custom slices; older kernels ignore it). A worker
/// woken on a core busy with a thread of the default slice then preempts it at once instead of
/// waiting up to a slice, and its share of the cores stays the same. The workers read and
/// write SWITCH and SWITCHED: on two vCPUs whose kernel packs woken threads onto a busy vCPU
/// (as this project's machines do), a trace showed both servers' workers queued 2.7 ms behind
/// a blocking-pool thread while the other vCPU idled.
pub fn as_worker() {
    take_role(ThreadRole::Worker);
}

/// For a blocking-pool thread about to run a migration's store work: `SCHED_BATCH` (see the
/// module's notes). The class must already hold when the thread is woken for its next job,
/// which is when the kernel decides on preemption, so it stays until the role changes.
pub(crate) fn as_pool() {
    take_role(ThreadRole::Pool);
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn current_policy() -> i32 {
        // SAFETY: pid 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) & !libc::SCHED_RESET_ON_FORK }
    }

    #[test]
    fn a_bulk_thread_runs_in_the_idle_class_and_comes_back() {
        std::thread::spawn(|| {
            assert_eq!(current_policy(), libc::SCHED_OTHER);
            let guard = BulkClass::enter();
            if guard.previous.is_some() {
                assert_eq!(current_policy(), libc::SCHED_IDLE);
            }
            drop(guard);
            assert_eq!(current_policy(), libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }

    fn thread_nice() -> i32 {
        // SAFETY: 0 is the calling thread.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
    }

    /// The slice the kernel reports for the calling thread (`sched_getattr`), in nanoseconds.
    fn current_slice() -> u64 {
        // SAFETY: `attr` lives across the call; its size is passed.
        unsafe {
            let mut attr: libc::sched_attr = std::mem::zeroed();
            let size = std::mem::size_of::<libc::sched_attr>() as u32;
            assert_eq!(libc::syscall(libc::SYS_sched_getattr, 0, &mut attr as *mut libc::sched_attr, size, 0), 0);
            attr.sched_runtime
        }
    }

    #[test]
    fn a_worker_asks_for_a_short_slice_and_a_pool_thread_gives_it_back() {
        std::thread::spawn(|| {
            let default = current_slice();
            as_worker();
            assert_eq!(current_policy(), libc::SCHED_OTHER);
            let short = current_slice();
            // Kernels before 6.12 have no custom slices and report the default.
            assert!(short == SHORT_SLICE.as_nanos() as u64 || short == default, "slice {short} ns");
            as_pool();
            assert_eq!(current_policy(), libc::SCHED_BATCH);
            assert_eq!(current_slice(), default);
            if can_come_back() {
                assert_eq!(thread_nice(), process_nice() + POOL_NICE, "a pool thread runs nicer");
            }
            // tokio may make it a worker again (`block_in_place`).
            as_worker();
            assert_eq!(current_policy(), libc::SCHED_OTHER);
            assert_eq!(current_slice(), short);
            assert_eq!(thread_nice(), process_nice(), "a worker again has the process's nice value");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_pool_thread_stays_in_the_batch_class() {
        std::thread::spawn(|| {
            as_pool();
            assert_eq!(current_policy(), libc::SCHED_BATCH, "any thread may enter SCHED_BATCH");
            // Idle work on it comes back to the batch class, not the normal one.
            let idle = BulkClass::enter();
            if idle.previous.is_some() {
                assert_eq!(current_policy(), libc::SCHED_IDLE);
            }
            drop(idle);
            assert_eq!(current_policy(), libc::SCHED_BATCH);
            as_pool();
            assert_eq!(current_policy(), libc::SCHED_BATCH);
        })
        .join()
        .unwrap();
    }
}
