//! A token bucket for the migration link (`--bandwidth`), whose rate an operator may change
//! while a migration runs (`migrate set-bandwidth`), and what a gang's migrations share of
//! the link ([`SharedLink`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::compress::{LevelController, LEVEL_WINDOW};
use crate::link::LinkQueue;

/// Allows `rate` bytes per second on average, in bursts of at most `burst` bytes.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `bits_per_second` as operators give link rates; bursts of 50 ms worth (at least one
    /// maximum frame would otherwise stall: a frame larger than the burst borrows ahead).
    pub fn new(bits_per_second: u64) -> TokenBucket {
        let (rate, burst) = Self::rate_and_burst(bits_per_second);
        TokenBucket { rate, burst, tokens: burst, last: Instant::now() }
    }

    /// Bytes per second and the burst allowed, for a rate in bits per second.
    fn rate_and_burst(bits_per_second: u64) -> (f64, f64) {
        let rate = bits_per_second as f64 / 8.0;
        (rate, (rate * 0.05).max(64.0 * 1024.0))
    }

    /// Changes the rate from now on; what was borrowed is repaid at the new rate.
    pub fn set_rate(&mut self, bits_per_second: u64) {
        self.refill();
        (self.rate, self.burst) = Self::rate_and_burst(bits_per_second);
        self.tokens = self.tokens.min(self.burst);
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
    }

    /// How long until the balance is back to zero (what was borrowed is repaid).
    pub fn debt(&mut self) -> Duration {
        self.refill();
        Duration::from_secs_f64(if self.tokens >= 0.0 { 0.0 } else { -self.tokens / self.rate })
    }

    /// How long to wait before sending `bytes`; the bytes are charged at once (the balance
    /// may go negative, which delays whatever comes next).
    pub fn charge(&mut self, bytes: usize) -> Duration {
        let wait = self.debt();
        self.tokens -= bytes as f64;
        wait
    }
}

/// The cap in force for one migration, in bits per second (0: none). The operator changes
/// it; every connection's writer follows it within [`LinkCap::RECHECK`].
#[derive(Debug, Default)]
pub struct CapSetting(AtomicU64);

impl CapSetting {
    pub fn new(bits_per_second: Option<u64>) -> CapSetting {
        CapSetting(AtomicU64::new(bits_per_second.unwrap_or(0)))
    }

    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&r| r > 0)
    }

    pub fn set(&self, bits_per_second: Option<u64>) {
        self.0.store(bits_per_second.unwrap_or(0), Ordering::Relaxed);
    }
}

/// A connection's writer side of the cap: a bucket at the rate in force.
#[derive(Debug, Default)]
pub struct LinkCap {
    bucket: Option<TokenBucket>,
    rate: Option<u64>,
}

impl LinkCap {
    /// How often a writer that waits for the cap looks at it again: a raised (or lifted) cap
    /// takes effect within this.
    pub const RECHECK: Duration = Duration::from_millis(100);

    /// Follows the setting: a new rate re-paces what is owed, no cap drops the bucket.
    pub fn follow(&mut self, setting: &CapSetting) {
        let rate = setting.get();
        if rate == self.rate {
            return;
        }
        self.rate = rate;
        match (rate, self.bucket.as_mut()) {
            (None, _) => self.bucket = None,
            (Some(r), Some(b)) => b.set_rate(r),
            (Some(r), None) => self.bucket = Some(TokenBucket::new(r)),
        }
    }

    /// How long to wait now before sending (at most [`Self::RECHECK`]: call again after).
    pub fn wait(&mut self, setting: &CapSetting) -> Duration {
        self.follow(setting);
        self.bucket.as_mut().map_or(Duration::ZERO, |b| b.debt().min(Self::RECHECK))
    }

    /// Charges a frame that goes out now.
    pub fn charge(&mut self, bytes: usize) {
        if let Some(b) = self.bucket.as_mut() {
            b.charge(bytes);
        }
    }
}

/// What the migrations of a gang share on their way out of this server (a migration alone is
/// a gang of one): one bandwidth cap (one setting and one bucket that every connection of
/// every member charges, so the gang as a whole keeps to it), and the right of way for
/// on-demand data: while one member's destination waits for blocks a reader needs now, the
/// others hold their background data back (each member's own writer already sends its
/// on-demand data first).
#[derive(Debug)]
pub struct SharedLink {
    setting: CapSetting,
    bucket: parking_lot::Mutex<LinkCap>,
    epoch: Instant,
    /// Until when (milliseconds since `epoch`) on-demand data has the right of way, and whose.
    urgent_until_ms: AtomicU64,
    urgent_member: AtomicUsize,
    /// The background zstd level, one for the whole gang (see [`SharedLink::observe_level`]).
    level: parking_lot::Mutex<SharedLevel>,
    /// Members between their freeze and SWITCHED: everyone's background data, and the other
    /// members' listings, wait (for at most [`SharedLink::MAX_SWITCH_HOLD`] after the latest
    /// freeze).
    switching: std::sync::Arc<parking_lot::Mutex<Vec<usize>>>,
    /// Wakes the writers that wait for a switch-over's end (see [`SharedLink::switch_ended`]).
    switch_ended: std::sync::Arc<tokio::sync::Notify>,
    switch_since_ms: AtomicU64,
    /// The members' link connections whose send queues can be read (see [`SharedLink::drain`]).
    queues: parking_lot::Mutex<Vec<Weak<dyn LinkQueue>>>,
}

/// What [`SharedLink::drain`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// How long it waited.
    pub waited: Duration,
    /// Bytes still unacknowledged when it stopped waiting (0: drained; None: no link could tell).
    pub left: Option<u64>,
}

/// Holds the background data of every member of a gang, and the other members' listings,
/// while it lives (one member's switch-over, from its freeze to SWITCHED).
#[derive(Debug)]
pub struct SwitchHold {
    switching: std::sync::Arc<parking_lot::Mutex<Vec<usize>>>,
    ended: std::sync::Arc<tokio::sync::Notify>,
    member: usize,
}

impl Drop for SwitchHold {
    fn drop(&mut self) {
        let mut switching = self.switching.lock();
        if let Some(i) = switching.iter().position(|m| *m == self.member) {
            switching.swap_remove(i);
        }
        drop(switching);
        self.ended.notify_waiters();
    }
}

/// One level controller for every compressor of a gang: the level trades the gang's CPU
/// against the gang's link, and members that each chased their own share of the link raised
/// their levels together until the CPU, not the link, held them all back.
#[derive(Debug)]
struct SharedLevel {
    controller: Option<LevelController>,
    /// Members that compressed since `since`, and how many did in the window before.
    seen: Vec<usize>,
    members: usize,
    since: Instant,
    /// Cores the gang's compression may keep busy together: all but one (one at least).
    core_budget: f64,
}

impl Default for SharedLink {
    fn default() -> Self {
        SharedLink {
            setting: CapSetting::default(),
            bucket: parking_lot::Mutex::default(),
            epoch: Instant::now(),
            urgent_until_ms: AtomicU64::new(0),
            urgent_member: AtomicUsize::new(0),
            switching: std::sync::Arc::default(),
            switch_ended: std::sync::Arc::default(),
            switch_since_ms: AtomicU64::new(0),
            queues: parking_lot::Mutex::default(),
            level: parking_lot::Mutex::new(SharedLevel {
                controller: None,
                seen: Vec::new(),
                members: 1,
                since: Instant::now(),
                core_budget: std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)) as f64,
            }),
        }
    }
}

impl SharedLink {
    /// How long the right of way lasts after the last sign of on-demand data (a FETCH, an
    /// on-demand frame written): enough to read, compress and write a small frame. A hint
    /// that lapses by itself, so nothing waits on a member that went away.
    pub const URGENT_WINDOW: Duration = Duration::from_millis(50);

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Member `member` (any number that tells the members apart) has on-demand data coming.
    pub fn urgent(&self, member: usize) {
        self.urgent_member.store(member, Ordering::Relaxed);
        self.urgent_until_ms.fetch_max(self.now_ms() + Self::URGENT_WINDOW.as_millis() as u64, Ordering::Relaxed);
    }

    /// Holds every member's background data, and the listings of the members other than
    /// `member`, until the returned guard is dropped: a member's switch-over, whose downtime is
    /// the round trip of its final listing and SWITCH, must not wait behind the others' data
    /// or listings in the link's queue.
    pub fn hold_for_switch(&self, member: usize) -> SwitchHold {
        self.switch_since_ms.store(self.now_ms(), Ordering::SeqCst);
        self.switching.lock().push(member);
        SwitchHold { switching: self.switching.clone(), ended: self.switch_ended.clone(), member }
    }

    /// Notified when a member's switch-over ends: a writer that waits for it takes a
    /// `notified()` future before it looks at [`SharedLink::switching`], then waits on it (a
    /// poll every few milliseconds instead added up to its period to the next member's
    /// downtime, when that member froze during this one's switch-over).
    pub fn switch_ended(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.switch_ended.clone()
    }

    fn switch_hold_lapsed(&self) -> bool {
        self.now_ms().saturating_sub(self.switch_since_ms.load(Ordering::SeqCst)) >= Self::MAX_SWITCH_HOLD.as_millis() as u64
    }

    /// Whether a member of the gang is switching over (background data waits). A switch-over
    /// takes milliseconds; one that waits longer (its link lost) stops holding the others.
    pub fn switching(&self) -> bool {
        !self.switching.lock().is_empty() && !self.switch_hold_lapsed()
    }

    /// Whether a member other than `member` is switching over while `member` is not
    /// (`member`'s listings wait). Two members that switch over at once both go: each holding
    /// the other's SWITCH would hold both until the hold lapsed.
    pub fn another_switching(&self, member: usize) -> bool {
        let switching = self.switching.lock();
        !switching.contains(&member) && !switching.is_empty() && !self.switch_hold_lapsed()
    }

    /// How long one member's switch-over holds the others' background data at most.
    pub const MAX_SWITCH_HOLD: Duration = Duration::from_secs(2);

    /// Watches a member's link connection (forgotten when its owner drops it).
    pub fn watch_queue(&self, queue: Weak<dyn LinkQueue>) {
        let mut queues = self.queues.lock();
        queues.retain(|q| q.strong_count() > 0);
        queues.push(queue);
    }

    /// Bytes the gang's links hold unacknowledged now; None when no link can tell.
    pub fn unacknowledged_bytes(&self) -> Option<u64> {
        let live: Vec<Arc<dyn LinkQueue>> = self.queues.lock().iter().filter_map(Weak::upgrade).collect();
        live.iter().filter_map(|q| q.unacknowledged_bytes()).reduce(|a, b| a + b)
    }

    /// Waits, at most `max`, until the gang's links hold nothing unacknowledged: everything
    /// written has crossed the network. A member whose switch-over it decides (not a
    /// hypervisor) calls this between holding the gang's background data and its freeze, so
    /// the freeze starts with the network's queues empty. Returns at once when no link can
    /// tell.
    pub async fn drain(&self, max: Duration) -> Drained {
        let start = Instant::now();
        loop {
            let left = self.unacknowledged_bytes();
            if left.is_none_or(|b| b == 0) || start.elapsed() >= max {
                return Drained { waited: start.elapsed(), left };
            }
            tokio::time::sleep(Self::DRAIN_POLL).await;
        }
    }

    /// How often [`SharedLink::drain`] reads the queues: a tenth of a 100 Mbit/s link's
    /// typical queue of a few milliseconds is noise.
    const DRAIN_POLL: Duration = Duration::from_millis(1);

    /// The background level now (`fixed`: the migration's own fixed level, if it has one).
    pub fn level(&self, fixed: Option<i32>) -> i32 {
        if let Some(l) = fixed {
            return l;
        }
        self.level.lock().controller.get_or_insert_with(|| LevelController::new(None)).level()
    }

    /// One background frame of `member`: time spent compressing it, blocked handing it to the
    /// link, and waiting for its blocks (see [`LevelController::observe`]). The members'
    /// times are summed into one window, each weighed by the number of members, so the window
    /// stays about [`LEVEL_WINDOW`] of wall time however many compress at once.
    pub fn observe_level(&self, member: usize, fixed: Option<i32>, busy: Duration, blocked: Duration, idle: Duration) {
        if fixed.is_some() {
            return;
        }
        let mut l = self.level.lock();
        if !l.seen.contains(&member) {
            l.seen.push(member);
        }
        if l.since.elapsed() >= 2 * LEVEL_WINDOW {
            l.members = l.seen.len();
            l.seen.clear();
            l.since = Instant::now();
        }
        let n = l.members.max(l.seen.len()).max(1) as u32;
        let budget = l.core_budget;
        let c = l.controller.get_or_insert_with(|| LevelController::new(None));
        c.set_gang(n, budget);
        c.observe(busy / n, blocked / n, idle / n);
    }

    /// How long `member` holds a background frame back now (at most [`LinkCap::RECHECK`]):
    /// another member's on-demand data goes first.
    pub fn yield_to_urgent(&self, member: usize) -> Duration {
        let until = self.urgent_until_ms.load(Ordering::Relaxed);
        let now = self.now_ms();
        if now >= until || self.urgent_member.load(Ordering::Relaxed) == member {
            return Duration::ZERO;
        }
        Duration::from_millis(until - now).min(LinkCap::RECHECK)
    }

    pub fn get(&self) -> Option<u64> {
        self.setting.get()
    }

    pub fn set(&self, bits_per_second: Option<u64>) {
        self.setting.set(bits_per_second)
    }

    /// How long a writer waits now before sending (at most [`LinkCap::RECHECK`]).
    pub fn wait(&self) -> Duration {
        self.bucket.lock().wait(&self.setting)
    }

    /// Charges a frame that goes out now.
    pub fn charge(&self, bytes: usize) {
        self.bucket.lock().charge(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link connection whose send queue a test sets.
    #[derive(Debug, Default)]
    struct QueueOf(AtomicU64);

    impl LinkQueue for QueueOf {
        fn unacknowledged_bytes(&self) -> Option<u64> {
            Some(self.0.load(Ordering::Relaxed))
        }
    }

    fn watch(link: &SharedLink, queue: &Arc<QueueOf>) {
        let weak: Weak<dyn LinkQueue> = Arc::downgrade(queue) as Weak<dyn LinkQueue>;
        link.watch_queue(weak);
    }

    #[tokio::test]
    async fn drain_waits_for_every_watched_link_and_forgets_closed_ones() {
        let link = SharedLink::default();
        let nothing = link.drain(Duration::from_secs(5)).await;
        assert_eq!(nothing.left, None, "no link can tell: nothing to wait for");
        assert!(nothing.waited < Duration::from_secs(1));

        let (busy, idle) = (Arc::new(QueueOf::default()), Arc::new(QueueOf::default()));
        busy.0.store(1000, Ordering::Relaxed);
        watch(&link, &busy);
        watch(&link, &idle);
        assert_eq!(link.unacknowledged_bytes(), Some(1000));
        let gave_up = link.drain(Duration::from_millis(20)).await;
        assert_eq!(gave_up.left, Some(1000));
        assert!(gave_up.waited >= Duration::from_millis(20));

        let emptied = busy.clone();
        let acks = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            emptied.0.store(0, Ordering::Relaxed);
        });
        let drained = link.drain(Duration::from_secs(5)).await;
        assert_eq!(drained.left, Some(0));
        assert!(drained.waited >= Duration::from_millis(25), "returned before the queue emptied: {drained:?}");
        acks.await.unwrap();

        busy.0.store(5, Ordering::Relaxed);
        drop(busy);
        assert_eq!(link.unacknowledged_bytes(), Some(0), "a closed connection no longer counts");
    }

    #[test]
    fn long_run_rate_is_the_configured_one() {
        let mut b = TokenBucket::new(8_000_000); // 1 MB/s
                                                 // Charges made at (almost) one instant: each wait is the time until the balance is
                                                 // back to zero, so the last one is when 10 MB - 100 kB may have been sent.
        let mut last = Duration::ZERO;
        for _ in 0..101 {
            last = b.charge(100_000);
        }
        assert!(last > Duration::from_secs_f64(9.8) && last < Duration::from_secs_f64(10.0), "{last:?}");
    }

    #[test]
    fn a_changed_cap_re_paces_what_is_owed() {
        let setting = CapSetting::new(Some(8_000_000)); // 1 MB/s
        let mut cap = LinkCap::default();
        assert_eq!(cap.wait(&setting), Duration::ZERO);
        cap.charge(2_000_000);
        let slow = cap.wait(&setting);
        assert_eq!(slow, LinkCap::RECHECK, "about 2 s owed, waited for in steps");
        setting.set(Some(8_000_000_000)); // 1 GB/s: the 2 MB owed take 2 ms
        assert!(cap.wait(&setting) < Duration::from_millis(5));
        setting.set(None);
        cap.charge(1 << 30);
        assert_eq!(cap.wait(&setting), Duration::ZERO, "no cap");
        assert_eq!(CapSetting::new(None).get(), None);
    }

    #[test]
    fn writers_sharing_a_cap_keep_to_it_together() {
        let cap = SharedLink::default();
        cap.set(Some(8_000_000)); // 1 MB/s for the gang
        assert_eq!(cap.wait(), Duration::ZERO);
        // Two members each send 1 MB at once: together they owe about 2 s.
        cap.charge(1_000_000);
        cap.charge(1_000_000);
        assert_eq!(cap.wait(), LinkCap::RECHECK);
        cap.set(None);
        assert_eq!(cap.wait(), Duration::ZERO);
    }

    #[test]
    fn a_gang_has_one_level_for_all_its_compressors() {
        let link = SharedLink::default();
        let ms = Duration::from_millis;
        assert_eq!(link.level(None), 3);
        // Two members, each blocked on the link most of the time: together, one window.
        for _ in 0..2 {
            link.observe_level(1, None, ms(50), ms(250), Duration::ZERO);
            link.observe_level(2, None, ms(50), ms(250), Duration::ZERO);
        }
        let up = link.level(None);
        assert!(up >= 5, "up for the whole gang: {up}");
        // Now compression holds the link up, window after window: down.
        for _ in 0..20 {
            link.observe_level(1, None, ms(300), Duration::ZERO, Duration::ZERO);
            link.observe_level(2, None, ms(300), Duration::ZERO, Duration::ZERO);
        }
        assert!(link.level(None) < up);
        assert_eq!(link.level(Some(9)), 9, "a fixed level is the migration's own");
    }

    #[test]
    fn a_switch_over_holds_the_gangs_background_data_while_it_lasts() {
        let link = SharedLink::default();
        assert!(!link.switching());
        let a = link.hold_for_switch(1);
        assert!(link.switching());
        assert!(link.another_switching(2), "member 2's listings wait for member 1's switch-over");
        assert!(!link.another_switching(1), "member 1's own listing and SWITCH go");
        assert!(link.another_switching(3));
        let b = link.hold_for_switch(2);
        assert!(!link.another_switching(1), "two members switching at once hold neither's SWITCH");
        assert!(!link.another_switching(2));
        assert!(link.another_switching(3), "the others still wait");
        drop(a);
        assert!(link.switching(), "another member still switching");
        assert!(!link.another_switching(2));
        assert!(link.another_switching(1), "member 1, done, waits for member 2 now");
        drop(b);
        assert!(!link.switching());
        assert!(!link.another_switching(1));
    }

    #[tokio::test]
    async fn the_end_of_a_switch_over_wakes_the_writers_that_wait_for_it() {
        let link = std::sync::Arc::new(SharedLink::default());
        let hold = link.hold_for_switch(1);
        let waiting = link.switch_ended().notified_owned();
        assert!(link.another_switching(2));
        let l = link.clone();
        let waiter = tokio::spawn(async move {
            waiting.await;
            l.another_switching(2)
        });
        tokio::task::yield_now().await;
        drop(hold);
        let still_held = tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken at once").unwrap();
        assert!(!still_held);
    }

    #[test]
    fn on_demand_data_of_one_member_holds_the_others_background_back_for_a_while() {
        let link = SharedLink::default();
        assert_eq!(link.yield_to_urgent(1), Duration::ZERO);
        link.urgent(2);
        assert_eq!(link.yield_to_urgent(2), Duration::ZERO, "its own background is ordered by its own writer");
        let wait = link.yield_to_urgent(1);
        assert!(wait > Duration::ZERO && wait <= SharedLink::URGENT_WINDOW, "{wait:?}");
        std::thread::sleep(SharedLink::URGENT_WINDOW + Duration::from_millis(5));
        assert_eq!(link.yield_to_urgent(1), Duration::ZERO, "the right of way lapses by itself");
    }
}
