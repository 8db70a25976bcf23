//! The system calls behind the scheduling roles (Linux; elsewhere they change nothing).

#[cfg(target_os = "linux")]
pub(super) fn gettid() -> libc::pid_t {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::gettid() }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn gettid() -> libc::pid_t {
    0
}

#[cfg(target_os = "linux")]
pub(super) const OTHER: libc::c_int = libc::SCHED_OTHER;
#[cfg(target_os = "linux")]
pub(super) const IDLE: libc::c_int = libc::SCHED_IDLE;
#[cfg(target_os = "linux")]
pub(super) const BATCH: libc::c_int = libc::SCHED_BATCH;
#[cfg(target_os = "linux")]
pub(super) const FIFO: libc::c_int = libc::SCHED_FIFO;
#[cfg(not(target_os = "linux"))]
pub(super) const OTHER: libc::c_int = 0;
#[cfg(not(target_os = "linux"))]
pub(super) const IDLE: libc::c_int = 0;
#[cfg(not(target_os = "linux"))]
pub(super) const BATCH: libc::c_int = 0;
#[cfg(not(target_os = "linux"))]
pub(super) const FIFO: libc::c_int = 0;

/// The calling thread's policy, when it is one of the three this module moves between.
#[cfg(target_os = "linux")]
pub(super) fn policy() -> Option<libc::c_int> {
    // SAFETY: pid 0 is the calling thread.
    let now = unsafe { libc::sched_getscheduler(0) } & !libc::SCHED_RESET_ON_FORK;
    [libc::SCHED_OTHER, libc::SCHED_BATCH, libc::SCHED_IDLE].contains(&now).then_some(now)
}

/// Sets thread `tid`'s (0: the calling thread's) policy and slice (None: the default slice),
/// its nice value kept; `SCHED_FIFO` at its lowest priority.
#[cfg(target_os = "linux")]
pub(super) fn set_attr_of(tid: libc::pid_t, policy: libc::c_int, slice: Option<std::time::Duration>, nice: Option<libc::c_int>) -> bool {
    // SAFETY: plain syscalls on one thread of this process; `attr` lives across the call and
    // its size field tells the kernel how much of it to read.
    let r = unsafe {
        let nice = nice.unwrap_or_else(|| libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t));
        let mut attr: libc::sched_attr = std::mem::zeroed();
        attr.size = std::mem::size_of::<libc::sched_attr>() as u32;
        attr.sched_policy = policy as u32;
        if policy == FIFO {
            attr.sched_priority = 1;
            // Threads started meanwhile (an NBD connection's, a new pool thread) must not
            // inherit the real-time class: they would keep it for life.
            attr.sched_flags = libc::SCHED_FLAG_RESET_ON_FORK as u64;
        } else {
            attr.sched_nice = nice;
        }
        attr.sched_runtime = slice.map_or(0, |d| d.as_nanos() as u64);
        libc::syscall(libc::SYS_sched_setattr, tid, &attr as *const libc::sched_attr, 0)
    };
    if r != 0 {
        tracing::debug!(tid, policy, ?slice, error = %std::io::Error::last_os_error(), "cannot change a thread's scheduling attributes");
    }
    r == 0
}

/// The process's nice value (its main thread's: Linux keeps one per thread).
#[cfg(target_os = "linux")]
pub(super) fn process_nice() -> libc::c_int {
    // SAFETY: plain syscalls.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::getpid() as libc::id_t) }
}

#[cfg(target_os = "linux")]
pub(super) fn current_policy_is(policy: libc::c_int) -> bool {
    // SAFETY: pid 0 is the calling thread.
    (unsafe { libc::sched_getscheduler(0) } & !libc::SCHED_RESET_ON_FORK) == policy
}

#[cfg(target_os = "linux")]
pub(super) fn set_policy(policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` lives across the call.
    let r = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if r != 0 {
        tracing::debug!(policy, error = %std::io::Error::last_os_error(), "cannot change a migration thread's scheduling class");
    }
    r == 0
}

/// Whether this process may move a thread from `SCHED_IDLE` back to the normal class: root
/// (which holds `CAP_SYS_NICE` unless a sandbox took it), or an `RLIMIT_NICE` that allows nice
/// 0 (20 - 0). Errs on the side of not entering.
#[cfg(target_os = "linux")]
pub(super) fn can_come_back() -> bool {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls; `limit` lives across the call.
    let (root, got) = unsafe { (libc::geteuid() == 0, libc::getrlimit(libc::RLIMIT_NICE, &mut limit) == 0) };
    root || (got && limit.rlim_cur >= 20)
}

#[cfg(not(target_os = "linux"))]
pub(super) fn set_policy(_policy: libc::c_int) -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
pub(super) fn set_attr_of(_tid: libc::pid_t, _policy: libc::c_int, _slice: Option<std::time::Duration>, _nice: Option<libc::c_int>) -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
pub(super) fn process_nice() -> libc::c_int {
    0
}

#[cfg(not(target_os = "linux"))]
pub(super) fn current_policy_is(_policy: libc::c_int) -> bool {
    false
}

#[cfg(not(target_os = "linux"))]
pub(super) fn policy() -> Option<libc::c_int> {
    None
}

#[cfg(not(target_os = "linux"))]
pub(super) fn can_come_back() -> bool {
    false
}
