//! The source's state machine (see the protocol's "State machines"): where it stands decides
//! what a failure may undo.

use crate::state::Stage;

/// Where the source stands. It moves only forward, except that a failure in `Frozen` thaws
/// the export and ends the migration, and that a destination which lost its switch-over
/// (power lost before it was durable) takes `PostCopy` back to `SwitchSent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SourceState {
    /// Listing and dirty rounds while the guest runs here; an operator may cancel.
    PreCopy,
    /// The export holds the guest's I/O; SWITCH has not been queued, so a failure thaws it
    /// and the source stays authoritative.
    Frozen,
    /// SWITCH may be on its way. Only the destination can say whether it switched, so the
    /// export is never thawed again; a lost link leaves the migration interrupted.
    SwitchSent,
    /// The destination serves the disk; the source answers post-copy fetches.
    PostCopy,
}

impl SourceState {
    /// Where a migration resumes after a restart of this server (from its record).
    pub(crate) fn restarted_at(stage: Option<Stage>) -> SourceState {
        match stage {
            None | Some(Stage::PreCopy) => SourceState::PreCopy,
            Some(Stage::SwitchingOver) => SourceState::SwitchSent,
            Some(Stage::Switched) => SourceState::PostCopy,
        }
    }

    /// The export is frozen: from `PreCopy` only.
    pub(crate) fn froze(&mut self) {
        debug_assert_eq!(*self, SourceState::PreCopy);
        *self = SourceState::Frozen;
    }

    /// SWITCH is about to be queued.
    pub(crate) fn switch_sent(&mut self) {
        debug_assert!(matches!(self, SourceState::Frozen | SourceState::SwitchSent));
        *self = SourceState::SwitchSent;
    }

    /// The destination said SWITCHED.
    pub(crate) fn switched(&mut self) {
        *self = SourceState::PostCopy;
    }

    /// The destination came back without its switch-over (its list of missing blocks was lost
    /// with its page cache): the disk, frozen here since, is listed and switched over again.
    pub(crate) fn switch_lost(&mut self) {
        debug_assert_eq!(*self, SourceState::PostCopy);
        *self = SourceState::SwitchSent;
    }

    /// Dirty tracking runs (the guest still writes here).
    pub(crate) fn is_tracking(self) -> bool {
        self == SourceState::PreCopy
    }

    /// A failure may thaw the export: only before SWITCH could have left.
    pub(crate) fn may_thaw(self) -> bool {
        self == SourceState::Frozen
    }

    /// A failure leaves the outcome to the destination.
    pub(crate) fn switch_in_doubt(self) -> bool {
        self == SourceState::SwitchSent
    }

    pub(crate) fn has_switched(self) -> bool {
        self == SourceState::PostCopy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_thaws_only_before_switch_is_sent() {
        let mut s = SourceState::restarted_at(None);
        assert!(s.is_tracking() && !s.may_thaw());
        s.froze();
        assert!(s.may_thaw() && !s.is_tracking());
        s.switch_sent();
        assert!(!s.may_thaw() && s.switch_in_doubt());
        s.switched();
        assert!(s.has_switched() && !s.may_thaw() && !s.switch_in_doubt());
        // A source restarted while frozen never thaws: SWITCH may have arrived.
        assert!(!SourceState::restarted_at(Some(Stage::SwitchingOver)).may_thaw());
        // A switch-over the destination lost is sent again; the disk is never thawed.
        s.switch_lost();
        assert!(s.switch_in_doubt() && !s.may_thaw() && !s.is_tracking());
        s.switch_sent();
        s.switched();
        assert!(s.has_switched());
    }
}
