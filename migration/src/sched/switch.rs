//! The switch-over's window: the runtime's async workers and its switch-over thread in
//! `SCHED_FIFO` from the moment a VM pauses until its disk is served at the destination.

use std::sync::Arc;

use super::sys::*;
use super::{apply_role, ThreadRole};

/// The longest a switch-over keeps the workers in the real-time class: a switch-over takes
/// milliseconds; one that has not ended by then (a lost link, a stuck hook) goes on in the
/// normal class.
const URGENT_AT_MOST: std::time::Duration = std::time::Duration::from_secs(2);

thread_local! {
    /// The runtime this thread belongs to, when its owner registers its threads
    /// ([`RuntimeThreads::join`]).
    pub(super) static RUNTIME: std::cell::RefCell<Option<Arc<RuntimeThreads>>> = const { std::cell::RefCell::new(None) };
}

/// The threads of one tokio runtime, by role, so that a switch-over can move all of its async
/// workers into `SCHED_FIFO` until it ends ([`urgent`]).
///
/// Why real-time: SWITCH and SWITCHED cross three or four tasks on both servers, and each hop
/// is a thread woken on a core. Short slices and a batch-class pool (the parent module) cut most waits, but
/// on two vCPUs a gang's other work (the other members' TLS, RocksDB's flushes, the guests'
/// I/O threads) is in the normal class too, and a full run still saw a downtime of 15 ms made
/// of three such hops. A worker in `SCHED_FIFO` preempts every normal thread as soon as it
/// wakes. The window is the switch-over's own (milliseconds, at most [`URGENT_AT_MOST`]); the
/// blocking pool's threads stay where they are, so store work keeps its place behind the
/// control path. Where the process may not use real-time classes, nothing changes.
#[derive(Debug, Default)]
pub struct RuntimeThreads {
    inner: parking_lot::Mutex<Threads>,
    /// Started with the registry ([`RuntimeThreads::new`]), or again on the next use if it
    /// could not start; stops when this is dropped.
    switch_thread: parking_lot::Mutex<Option<std::sync::mpsc::Sender<SwitchJob>>>,
}

/// A blocking step of a switch-over, run on the runtime's switch-over thread.
type SwitchJob = Box<dyn FnOnce() + Send>;

#[derive(Debug, Default)]
struct Threads {
    roles: std::collections::HashMap<libc::pid_t, ThreadRole>,
    /// Switch-overs under way (their [`Urgent`] guards).
    windows: std::collections::BTreeSet<u64>,
    next_window: u64,
}

impl RuntimeThreads {
    /// The registry, with its switch-over thread started now: started at the first
    /// switch-over, it cost that switch-over 0.4 ms.
    pub fn new() -> Arc<RuntimeThreads> {
        let threads: Arc<RuntimeThreads> = Arc::default();
        threads.switch_thread();
        threads
    }

    /// For tokio's `on_thread_start`: the calling thread is one of this runtime's.
    pub fn join(self: &Arc<Self>) {
        RUNTIME.with(|r| *r.borrow_mut() = Some(self.clone()));
        self.inner.lock().roles.insert(gettid(), ThreadRole::Unknown);
    }

    /// For tokio's `on_thread_stop`: its id may go to another process's thread next.
    pub fn leave() {
        if let Some(threads) = RUNTIME.with(|r| r.borrow_mut().take()) {
            threads.inner.lock().roles.remove(&gettid());
        }
    }

    /// The calling thread took `role`. Under the lock, so that a window opening meanwhile
    /// cannot be undone by this change.
    pub(super) fn took(&self, role: ThreadRole) {
        let mut threads = self.inner.lock();
        threads.roles.insert(gettid(), role);
        let urgent = !threads.windows.is_empty();
        // A thread some other code put in another class (idle) is left there.
        if matches!(policy(), Some(OTHER) | Some(BATCH)) || current_policy_is(FIFO) {
            apply_role(0, role, urgent);
        }
    }

    /// The switch-over thread's queue, the thread started if it is not running.
    fn switch_thread(&self) -> Option<std::sync::mpsc::Sender<SwitchJob>> {
        let mut sender = self.switch_thread.lock();
        if let Some(s) = sender.as_ref() {
            return Some(s.clone());
        }
        let (jobs, queue) = std::sync::mpsc::channel::<SwitchJob>();
        let (tid_tx, tid_rx) = std::sync::mpsc::sync_channel(1);
        let started = std::thread::Builder::new().name("migration-switch".into()).spawn(move || {
            let _ = tid_tx.send(gettid());
            // Ends when the registry, which holds the queue's sender, is dropped.
            while let Ok(job) = queue.recv() {
                job();
            }
        });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the switch-over thread; switch-overs run their blocking steps in place");
            return None;
        }
        let tid = tid_rx.recv().ok()?;
        // It takes the workers' class, in and out of switch-overs, from here on.
        let mut threads = self.inner.lock();
        threads.roles.insert(tid, ThreadRole::Worker);
        apply_role(tid, ThreadRole::Worker, !threads.windows.is_empty());
        drop(threads);
        *sender = Some(jobs.clone());
        Some(jobs)
    }

    fn open(self: &Arc<Self>) -> u64 {
        let mut threads = self.inner.lock();
        let window = threads.next_window;
        threads.next_window += 1;
        threads.windows.insert(window);
        if threads.windows.len() == 1 {
            let moved = threads.roles.iter().filter(|(_, r)| **r == ThreadRole::Worker).filter(|(tid, _)| apply_role(**tid, ThreadRole::Worker, true)).count();
            tracing::debug!(workers = moved, "switch-over: async workers in SCHED_FIFO");
        }
        window
    }

    fn close(&self, window: u64) {
        let mut threads = self.inner.lock();
        if threads.windows.remove(&window) && threads.windows.is_empty() {
            for (tid, role) in &threads.roles {
                if *role == ThreadRole::Worker {
                    apply_role(*tid, ThreadRole::Worker, false);
                }
            }
            tracing::debug!("switch-over ended: async workers back in the normal class");
        }
    }
}

/// Keeps the calling runtime's async workers in `SCHED_FIFO` while it lives (see
/// [`RuntimeThreads`]), at most [`URGENT_AT_MOST`].
#[must_use]
pub struct Urgent {
    window: Option<(Arc<RuntimeThreads>, u64)>,
}

impl std::fmt::Debug for Urgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Urgent").field("window", &self.window.as_ref().map(|w| w.1)).finish()
    }
}

/// Runs `step`, a short blocking step inside a switch-over's downtime (a journal write), on
/// the calling runtime's switch-over thread: a thread of its own that takes the workers' class
/// (`SCHED_FIFO` during the switch-over), so it runs the moment it is handed the step. The
/// alternatives each cost milliseconds in traces of a gang on two vCPUs: a blocking-pool
/// thread has to wait for a core, and `block_in_place` hands the worker's queue (with the task
/// that writes SWITCHED) to a pool thread outside the real-time class. Gives the step back
/// when the calling thread's runtime has no registry ([`RuntimeThreads`]) or the thread cannot
/// start.
pub fn on_switch_thread<T, F>(step: F) -> Result<tokio::sync::oneshot::Receiver<T>, F>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let Some(jobs) = RUNTIME.with(|r| r.borrow().clone()).and_then(|threads| threads.switch_thread()) else {
        return Err(step);
    };
    let (done, result) = tokio::sync::oneshot::channel();
    let step = Arc::new(parking_lot::Mutex::new(Some(step)));
    let for_job = step.clone();
    let job: SwitchJob = Box::new(move || {
        if let Some(step) = for_job.lock().take() {
            let _ = done.send(step());
        }
    });
    match jobs.send(job) {
        Ok(()) => Ok(result),
        // The thread is gone (it cannot be while the registry holds its queue); the job was
        // not run, so the step is still there.
        Err(unsent) => {
            drop(unsent);
            Err(step.lock().take().expect("an unsent job has not run"))
        }
    }
}

/// Opens a switch-over's window on the calling thread's runtime; nothing happens on a thread
/// of a runtime whose owner did not register its threads (tests, tools).
pub fn urgent() -> Urgent {
    let Some(threads) = RUNTIME.with(|r| r.borrow().clone()) else {
        return Urgent { window: None };
    };
    let window = threads.open();
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let lapse = threads.clone();
        runtime.spawn(async move {
            tokio::time::sleep(URGENT_AT_MOST).await;
            lapse.close(window);
        });
    }
    Urgent { window: Some((threads, window)) }
}

impl Drop for Urgent {
    fn drop(&mut self) {
        if let Some((threads, window)) = self.window.take() {
            threads.close(window);
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::super::{as_pool, as_worker};
    use super::*;

    fn current_policy() -> i32 {
        // SAFETY: pid 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) & !libc::SCHED_RESET_ON_FORK }
    }

    /// The policy of the worker that runs a task of `runtime`.
    fn worker_policy(runtime: &tokio::runtime::Runtime) -> i32 {
        runtime.block_on(async { tokio::spawn(async { current_policy() }).await.unwrap() })
    }

    /// The policy of the runtime's switch-over thread, asked from a worker.
    fn switch_thread_policy(runtime: &tokio::runtime::Runtime) -> i32 {
        runtime.block_on(async { tokio::spawn(async { on_switch_thread(current_policy).ok().expect("a registered runtime").await.unwrap() }).await.unwrap() })
    }

    /// A runtime of `workers` async workers registered in `threads`, as `nbd-server` builds it.
    fn registered_runtime(threads: &Arc<RuntimeThreads>, workers: usize) -> tokio::runtime::Runtime {
        let joining = threads.clone();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .on_thread_start(move || joining.join())
            .on_thread_stop(RuntimeThreads::leave)
            .on_thread_unpark(as_worker)
            .build()
            .unwrap()
    }

    #[test]
    fn a_switch_over_puts_the_workers_in_the_real_time_class_until_it_ends() {
        let threads = RuntimeThreads::new();
        let runtime = registered_runtime(&threads, 2);
        assert_eq!(worker_policy(&runtime), libc::SCHED_OTHER);
        // A worker takes its role when it first wakes from parking: until then (the first
        // moments of the runtime) a window does not know it. The third is the switch-over
        // thread, registered from the start.
        let workers = || threads.inner.lock().roles.values().filter(|r| **r == ThreadRole::Worker).count();
        for _ in 0..1000 {
            if workers() == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            worker_policy(&runtime);
        }
        assert_eq!(workers(), 3);
        // Opened on a worker, as the servers do (the registry is found from the thread).
        let window = runtime.block_on(async { tokio::spawn(async { urgent() }).await.unwrap() });
        assert!(window.window.is_some(), "a registered runtime's worker opens a window");
        let permitted = set_attr_of(0, FIFO, None, None) && set_policy(OTHER);
        if permitted {
            for _ in 0..8 {
                assert_eq!(worker_policy(&runtime), libc::SCHED_FIFO);
            }
            // A blocking-pool thread stays in the batch class meanwhile.
            let pool = runtime.block_on(async {
                tokio::task::spawn_blocking(|| {
                    as_pool();
                    current_policy()
                })
                .await
                .unwrap()
            });
            assert_eq!(pool, libc::SCHED_BATCH);
            // The switch-over thread is in the class too.
            assert_eq!(switch_thread_policy(&runtime), libc::SCHED_FIFO);
            // A thread a worker starts meanwhile does not inherit it.
            let child = runtime.block_on(async { tokio::spawn(async { std::thread::spawn(current_policy).join().unwrap() }).await.unwrap() });
            assert_eq!(child, libc::SCHED_OTHER);
        }
        // Two windows at once: the workers leave the class when the last one ends.
        let second = runtime.block_on(async { tokio::spawn(async { urgent() }).await.unwrap() });
        drop(window);
        if permitted {
            assert_eq!(worker_policy(&runtime), libc::SCHED_FIFO);
        }
        drop(second);
        for _ in 0..8 {
            assert_eq!(worker_policy(&runtime), libc::SCHED_OTHER);
        }
        assert_eq!(switch_thread_policy(&runtime), libc::SCHED_OTHER);
        // Outside a registered runtime, a window is nothing, and a step is given back.
        assert!(urgent().window.is_none());
        assert!(on_switch_thread(|| ()).is_err());
        drop(runtime);
        assert_eq!(threads.inner.lock().roles.len(), 1, "stopped runtime threads leave the registry; the switch-over thread stays");
    }

    #[test]
    fn a_switch_over_window_lapses() {
        let threads = RuntimeThreads::new();
        let runtime = registered_runtime(&threads, 1);
        let window = runtime.block_on(async { tokio::spawn(async { urgent() }).await.unwrap() });
        std::thread::sleep(URGENT_AT_MOST + std::time::Duration::from_millis(200));
        assert!(threads.inner.lock().windows.is_empty(), "a window left open closes by itself");
        assert_eq!(worker_policy(&runtime), libc::SCHED_OTHER);
        drop(window);
    }
}
