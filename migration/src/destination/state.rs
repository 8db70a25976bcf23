//! The destination's state machine for one incoming disk (see the protocol's "State
//! machines"): what its export may do in each state.

/// Where an incoming disk stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DiskPhase {
    /// Before SWITCH: the source is authoritative. The standby export answers reads with the
    /// source's current content and holds writes until the switch-over.
    Standby,
    /// SWITCH applied: this server serves the disk; blocks still missing are fetched.
    PostCopy,
    /// The migration ended before SWITCH (cancelled, failed, timed out): the source keeps
    /// the disk and the standby export goes away; held requests fail.
    Abandoned(String),
    /// The link failed for good after SWITCH: blocks still missing cannot be read.
    Broken(String),
}

impl DiskPhase {
    /// Whether this server has taken the disk over (SWITCH was applied).
    pub(crate) fn has_switched(&self) -> bool {
        matches!(self, DiskPhase::PostCopy | DiskPhase::Broken(_))
    }

    /// The state a failure leads to.
    pub(crate) fn failed(&self, why: String) -> DiskPhase {
        if self.has_switched() {
            DiskPhase::Broken(why)
        } else {
            DiskPhase::Abandoned(why)
        }
    }

    /// Why requests can no longer be served, if they cannot.
    pub(crate) fn failure(&self) -> Option<&str> {
        match self {
            DiskPhase::Abandoned(why) | DiskPhase::Broken(why) => Some(why),
            DiskPhase::Standby | DiskPhase::PostCopy => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_keeps_the_side_of_the_switch() {
        assert_eq!(DiskPhase::Standby.failed("x".into()), DiskPhase::Abandoned("x".into()));
        assert_eq!(DiskPhase::PostCopy.failed("x".into()), DiskPhase::Broken("x".into()));
        assert!(DiskPhase::Broken("x".into()).has_switched());
        assert!(!DiskPhase::Abandoned("x".into()).has_switched());
        assert_eq!(DiskPhase::Broken("y".into()).failure(), Some("y"));
        assert_eq!(DiskPhase::PostCopy.failure(), None);
    }
}
