//! Counted budgets (requests in flight, buffer bytes) that blocking threads draw from.
//!
//! A connection's requests run on its own threads (see [`crate::conn`]), so the budgets they
//! share are blocking semaphores: a thread that finds a budget spent waits, holding its
//! connection's read side, and TCP pushes back on the client. Taking an uncontended budget is
//! one short mutex section.

use std::fmt;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// A count of units that threads take and give back.
pub(crate) struct Budget {
    available: Mutex<usize>,
    returned: Condvar,
    total: usize,
}

impl fmt::Debug for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget").field("available", &*self.available.lock()).field("total", &self.total).finish()
    }
}

impl Budget {
    pub(crate) fn new(total: usize) -> Arc<Budget> {
        Arc::new(Budget { available: Mutex::new(total), returned: Condvar::new(), total })
    }

    /// Takes `units` (at most the total), waiting until they are free.
    pub(crate) fn take(self: &Arc<Self>, units: usize) -> Grant {
        let units = units.min(self.total);
        let mut available = self.available.lock();
        while *available < units {
            self.returned.wait(&mut available);
        }
        *available -= units;
        Grant { budget: Arc::clone(self), units }
    }

    /// Takes `units` (at most the total) if they are free now.
    pub(crate) fn try_take(self: &Arc<Self>, units: usize) -> Option<Grant> {
        let units = units.min(self.total);
        let mut available = self.available.lock();
        if *available < units {
            return None;
        }
        *available -= units;
        Some(Grant { budget: Arc::clone(self), units })
    }

    /// Units taken and not yet given back.
    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        self.total - *self.available.lock()
    }
}

/// Units taken from a [`Budget`]; given back when dropped.
#[derive(Debug)]
pub(crate) struct Grant {
    budget: Arc<Budget>,
    units: usize,
}

impl Drop for Grant {
    fn drop(&mut self) {
        if self.units > 0 {
            *self.budget.available.lock() += self.units;
            self.budget.returned.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn waits_until_units_come_back() {
        let budget = Budget::new(10);
        let a = budget.take(6);
        let b = budget.take(4);
        assert_eq!(budget.in_use(), 10);
        let waiter = {
            let budget = Arc::clone(&budget);
            std::thread::spawn(move || budget.take(5))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished(), "nothing was given back yet");
        drop(a);
        let c = waiter.join().unwrap();
        assert_eq!(budget.in_use(), 9);
        drop((b, c));
        assert_eq!(budget.in_use(), 0);
        // More than the total is capped to the total (it would never be granted otherwise).
        let all = budget.take(1000);
        assert_eq!(budget.in_use(), 10);
        drop(all);
    }
}
