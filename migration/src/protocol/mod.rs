//! The migration wire protocol: a pure codec, no I/O.
//!
//! # Connection
//! The source server connects to the destination server's migration listener. Both send an
//! 8-byte preamble `CASMIGR\0` and a big-endian u16 protocol version, then frames:
//!
//! ```text
//! frame   = type (u8) | payload length (u32 BE) | payload
//! ```
//!
//! A payload longer than [`MAX_PAYLOAD`] is refused before anything is allocated for it.
//! Control messages carry JSON (unknown fields are ignored); bulk messages are binary.
//!
//! # Message diagram (one migration)
//! ```text
//! source                                              destination
//!   preamble+version  ------------------------------>
//!                     <------------------------------  preamble+version
//!   HELLO {id,disk,size,block_size,algorithm,mode} >  checks, creates the incoming disk,
//!                                                      exports it in standby (see below)
//!                     <------------------------------  ACCEPT {processed:0} | ERROR
//!   FINGERPRINTS (round 0: the map snapshot) ------->  has_many: hits mapped at once
//!                     <------------------------------  ACK n (after each sequenced message)
//!                     <------------------------------  WANT (fingerprints it lacks, once each)
//!                                                      or WANT_LISTED (the same as flags on
//!                                                      the frame's blocks, before its ACK)
//!   DATA (zstd frames of block records) ------------>  verify fingerprint, store, map
//!     (with `unnamed_blocks` in HELLO and ACCEPT, a whole block comes without its
//!     fingerprint: the destination hashes it and keeps it if it asked for that content)
//!     or DATA_STREAM {stream, raw_len} when HELLO and ACCEPT both say `data_stream`: the
//!     next flushed piece of the connection's background or urgent zstd stream
//!   ROUND_END 0 ------------------------------------>
//!                     <------------------------------  ROUND_DONE 0 (everything wanted arrived)
//!   FINGERPRINTS/ROUND_END (dirty rounds) ---------->  ... (as round 0; with defer_dirty,
//!                     <------------------------------  ROUND_DONE k   only mapped: no WANT)
//!                     <------------------------------  READ {id,offset,length} (a standby
//!   READ_DATA {id, bytes | error} ------------------>   read; any time before SWITCHED)
//!   [manual: listing-only rounds every 0.5 s until the operator's `switch`]
//!   [source export frozen (its I/O held); background DATA held]
//!   FINGERPRINTS (final dirty blocks), ROUND_END last
//!   SWITCH ----------------------------------------->  export becomes writable (post-copy)
//!                     <------------------------------  SWITCHED {report}
//!                     <------------------------------  WANT (what deferred rounds left)
//!                     <------------------------------  FETCH (a read needs these now)
//!   DATA (on-demand ahead of background) ----------->
//!                     <------------------------------  COMPLETE {report}: every block local
//!   BYE -------------------------------------------->  [source releases its disk]
//! ```
//! **Listing window.** The destination holds back the initial listing's FINGERPRINTS (reads
//! them, neither applies nor acknowledges them) while [`crate::LISTING_WINDOW_BLOCKS`] listed
//! blocks are missing and content it asked for is on its way; the source, which keeps at most
//! `OUTBOX_FRAMES` unacknowledged, stops listing. What either side tracks per missing block
//! is then bounded whatever the disk's size. Frames of the switch-over are pushed past that
//! cap, and the destination applies everything it held when it reads one (the source holds
//! its data back during the freeze, so waiting for room then would wait for ever). No
//! message is added: an older peer on either side still works, unbounded as before.
//!
//! The switch-over's pause is the final listing's round trip, so everything before the freeze
//! works to keep that listing small and the link empty: dirty rounds repeat while the dirty
//! set shrinks (with `defer_dirty` they carry fingerprints only, so they take milliseconds),
//! and from the freeze until SWITCH is written the source sends no background DATA (a deep
//! queue on a WAN link would otherwise hold SWITCH behind megabytes of data).
//!
//! **Standby.** From HELLO until SWITCH the destination exports the disk under its real name
//! (a hypervisor opens its disks when it creates the incoming VM, long before the pause):
//! reads are answered with the source's current content (READ / READ_DATA, at most
//! [`MAX_READ`] bytes each, resent on a new connection under the same id; only when HELLO has
//! `read_through`), writes wait for the switch-over and are then applied, FLUSH succeeds at
//! once (nothing was acknowledged there). Nothing stale is returned and no write is lost.
//!
//! **Switch on command.** With `--switch-after manual` the source keeps the dirty set small
//! with listing-only rounds until an operator (the hypervisor's hook when it pauses the VM)
//! asks for the switch-over; the messages are those of any other switch-over.
//!
//! A *plan* (mode `plan`) sends round 0's fingerprints and ROUND_END, and the destination
//! answers PLAN with what it would need, changing nothing.
//!
//! # Resume (a lost link, or a restart of either side)
//! FINGERPRINTS, ROUND_END, SWITCH and BYE are *sequenced*: the destination counts those it
//! has applied and acknowledges the count (ACK); the source keeps the unacknowledged ones.
//! Everything else is regenerated from state, so nothing is lost with a connection:
//! ```text
//!   HELLO {same id, resume:true, rebuild} ---------->  finds the parked migration
//!                     <------------------------------  ACCEPT {processed n, switched, rebuild}
//!                     <------------------------------  FETCH (every block a reader waits for)
//!                     <------------------------------  WANT (every fingerprint still missing)
//!                     <------------------------------  ROUND_DONE / SWITCHED again if already sent
//!   sequenced messages from n on (or, with rebuild,
//!   the whole map again with zero runs) ----------->  blocks it holds are not asked for again
//! ```
//! Only data in flight when the link dropped crosses twice: what arrived was verified and
//! stored, and is no longer wanted. A destination restarted before the switch-over has its
//! partial disk but not its place in the rounds, so it answers `rebuild`; a source restarted
//! before the switch-over asks for one. A source that gave up reconnecting keeps its state
//! (`interrupted`) until an operator resumes or cancels it; cancel sends ERROR, on which the
//! destination deletes its partial disk.
//!
//! # State machines
//! Source (`source::state::SourceState`): `PreCopy` (listing and rounds; cancellable) ->
//! `Frozen` (export holds I/O; a failure thaws it) -> `SwitchSent` (SWITCH may have left: never
//! thaw again) -> `PostCopy` (answers fetches) -> done.
//! Destination, per disk (`destination::state::DiskPhase`): `Standby` (reads through to the
//! source, writes held) -> `PostCopy` (serves the disk, fetches what is missing) -> complete;
//! or `Abandoned` (failed or cancelled before SWITCH: standby requests fail, the partial disk
//! goes) / `Broken` (link lost for good after SWITCH: missing blocks cannot be read). Either side sends
//! ERROR and closes on a violation; a destination that fails before SWITCHED deletes its
//! partial disk, and the source, still authoritative, thaws its export. A lost link is not a
//! violation: both sides keep their state (the destination *parks* it under the migration
//! id) and the source reconnects with backoff. A source frozen for the switch-over never
//! thaws once SWITCH may have reached the destination: only the destination can say whether
//! it switched, so the source waits for it.
//!
//! SWITCHED does not wait for a device cache flush: the destination writes its list of
//! missing blocks (the switch-over's mark) into the page cache, answers, and then makes it
//! durable (the store's data first, then the list), before any FLUSH or FUA of the guest
//! completes there. A crash of the destination's process keeps the mark. A power loss before
//! the sync loses it: the destination comes back before its switch-over and answers the
//! source's reconnection with `rebuild`. A source in `PostCopy` that gets `rebuild` goes back
//! to `SwitchSent` (the one step back in its machine): its disk has stayed frozen, so it
//! lists it again, sends SWITCH again and waits for SWITCHED. The guest loses no write it was
//! promised, since none had been.
//!
//! # Gangs (several disks moved together)
//! A gang is a set of ordinary migrations, one per disk, each with its own connection, rounds,
//! switch-over, downtime, cancel and resume; their HELLOs carry the same `gang` name. The
//! destination asks once for content that several members lack: the first member whose
//! listing misses a content sends WANT for it to its own source; a member that lists the same
//! content while it is on its way sends no WANT, and maps the blocks when the first member's
//! copy is stored (a map entry, no copy). If that member ends without delivering it (its
//! source answered GONE, or it failed or was cancelled), the others send their own WANT; a
//! reader that needs such a block now sends FETCH to its own source at once. No message
//! changes for this: a source that is not in a gang sees nothing new. At the source the
//! members share one bandwidth cap and give way to each other's on-demand data (see
//! [`crate::ratelimit::SharedLink`]). The destination's side is `destination/gang.rs`.
//!
//! # Delta (blocks sent as differences from similar blocks)
//! When HELLO and ACCEPT both say `delta`, the source looks, for each wanted block, for a
//! similar block in its own store (the resemblance index, `cas_store::Store::similar_blocks`)
//! and asks whether the destination holds it, before that block's turn to be sent:
//! ```text
//!                     <------------------------------  WANT [x, y, ...]
//!   REF_QUERY {id, [r(x), ...]} -------------------->  has_many
//!                     <------------------------------  REF_HELD {id, bitmap}
//!   DATA_STREAM: record x as a delta against r(x) -->  decode with its copy of r(x),
//!                                                      check x's fingerprint
//!                     <------------------------------  REFETCH [x] (only if that failed)
//!   DATA_STREAM: record x whole -------------------->
//! ```
//! A delta record is `fingerprint | 2 | reference fingerprint | length (u16 LE) | a zstd
//! frame compressed with the reference as raw-content dictionary` (see [`crate::compress`]);
//! it decodes to at most one block. The queries run ahead of the data (blocks without a
//! candidate go at once, the others when the answer comes), so the round trip does not stall
//! the link. The destination checks the decoded block's fingerprint as for any block; a
//! delta it cannot use (reference not held, damaged, or a mismatch) is logged, counted
//! (`delta_refetched`) and asked for whole with REFETCH; nothing unverified is stored. Query
//! state belongs to one connection: after a lost link WANT comes again and so do the queries.
//!
//! # Asking by position
//! When HELLO says `want_listed`, the destination asks for content it found missing in a
//! FINGERPRINTS frame with WANT_LISTED `{seq, one flag per listed block}` instead of a WANT
//! of 16-byte fingerprints: a bit per listed block instead of 128 per wanted one (on the
//! test images about 1 % of the link's bytes). It sends WANT_LISTED while it applies frame
//! `seq`, before that frame's ACK on the same connection, so the source still holds the frame
//! (it keeps sequenced frames until acknowledged) and reads the fingerprints back from it.
//! Everything asked for at any other time (blocks whose mapping failed later, a gang
//! member's content that did not come, the WANT of a resumed connection, deferred content
//! at the switch-over) goes as WANT. A WANT_LISTED naming a frame the source no longer
//! holds can only be a stale one from a superseded connection, whose content the resumed
//! connection's WANT asks for again: the source ignores it. One naming a frame not yet
//! sent, or with another number of flags than the frame's listed blocks, is a violation.
//!
//! # Version policy
//! [`VERSION`] changes only when a message changes meaning or layout. Peers must speak the
//! same version; a mismatch is answered with ERROR naming both versions. New optional JSON
//! fields and new message types that an older peer never receives do not change it.
//! Version 2 added resume (ACCEPT's payload, ACK, HELLO's resume fields). READ and READ_DATA
//! came later without a version change: a destination sends READ only to a source whose
//! HELLO says `read_through` (an older source's destination holds standby reads until the
//! switch-over instead). REF_QUERY, REF_HELD, REFETCH and delta records came the same way:
//! they are sent only when both HELLO and ACCEPT say `delta`. The unnamed record layout (whole
//! blocks without their fingerprint) is used only when both say `unnamed_blocks`; WANT_LISTED
//! is sent only to a source whose HELLO says `want_listed`.

mod codec;

pub use codec::{check_greeting, decode, decode_header, encode, greeting};
pub(crate) use codec::{SWITCHED_TAG, SWITCH_TAG};

use serde::{Deserialize, Serialize};

use cas_store::Fingerprint;

pub const PREAMBLE: [u8; 8] = *b"CASMIGR\0";
pub const VERSION: u16 = 2;
/// Preamble and version.
pub const GREETING_LEN: usize = 10;
pub const HEADER_LEN: usize = 5;
/// Largest frame payload (a DATA frame holds at most a few MiB of compressed blocks).
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Largest decompressed DATA payload.
pub const MAX_RAW_DATA: usize = 16 << 20;
/// Most fingerprints in one WANT or FETCH frame, and entries in one FINGERPRINTS frame.
pub const MAX_LIST: usize = 1 << 18;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("not a migration peer (bad preamble)")]
    BadPreamble,
    #[error("peer speaks migration protocol version {peer}, this server speaks {ours}")]
    Version { peer: u16, ours: u16 },
    #[error("frame of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
}

pub(crate) fn malformed(what: &'static str, why: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed { what, why: why.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Migrate,
    Plan,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub migration_id: String,
    pub disk: String,
    pub size: u64,
    pub block_size: u32,
    pub algorithm: String,
    pub mode: Mode,
    /// This connection continues migration `migration_id` after a lost link or a restart.
    #[serde(default)]
    pub resume: bool,
    /// The source lost its place (it restarted): it lists the whole disk again, zero runs
    /// included, and the destination keeps what it already holds.
    #[serde(default)]
    pub rebuild: bool,
    /// Rounds after round 0 (the final one included) are listings only: the destination maps
    /// what it already holds and leaves the rest missing until the switch-over, when it asks
    /// for it as post-copy. A block rewritten while the VM runs then crosses once, with its
    /// last content, and the source can repeat cheap rounds until the listing left for the
    /// freeze is small. A destination that predates this field asks at once, which is still
    /// correct (the rounds then wait for the data).
    #[serde(default)]
    pub defer_dirty: bool,
    /// The source answers READ: before the switch-over the destination serves a *standby*
    /// export of the disk whose reads are answered with the source's current content.
    #[serde(default)]
    pub read_through: bool,
    /// The source can send block data as DATA_STREAM (one zstd stream per connection and
    /// urgency, see [`crate::stream`]); it does if ACCEPT says the destination can take it.
    #[serde(default)]
    pub data_stream: bool,
    /// The migration belongs to a gang (disks moved together, see [`crate::destination`]'s
    /// gang notes): content that another migration of the same gang already asked for is
    /// not asked for again; it is mapped when that migration's copy arrives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<String>,
    /// The source can send blocks as deltas against similar blocks both sides hold (see
    /// "Delta" above); it does if ACCEPT says the destination can decode them.
    #[serde(default)]
    pub delta: bool,
    /// The source can send block records in the unnamed layout (whole blocks without their
    /// fingerprint, which the destination computes; see [`crate::compress`]); it does if
    /// ACCEPT says the destination takes it.
    #[serde(default)]
    pub unnamed_blocks: bool,
    /// The source keeps each FINGERPRINTS frame until it is acknowledged and resolves
    /// WANT_LISTED against it (see "Asking by position").
    #[serde(default)]
    pub want_listed: bool,
}

/// The destination's answer to HELLO: where a resumed migration continues.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptInfo {
    /// Sequenced messages (see [`Message::is_sequenced`]) the destination has applied; the
    /// source resends those after them.
    pub processed: u64,
    /// The destination already serves the disk.
    pub switched: bool,
    /// The destination lost its place (it restarted before the switch-over) or the source
    /// asked for it: the source lists the whole disk again from a fresh snapshot.
    pub rebuild: bool,
    /// The destination takes DATA_STREAM on this connection (the source offered it).
    #[serde(default)]
    pub data_stream: bool,
    /// The destination answers REF_QUERY and decodes delta records (the source offered it).
    #[serde(default)]
    pub delta: bool,
    /// The destination takes block records in the unnamed layout (the source offered it).
    #[serde(default)]
    pub unnamed_blocks: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMessage {
    pub message: String,
}

/// A run of consecutive blocks in a FINGERPRINTS frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    /// Blocks `first..first + fps.len()` hold these fingerprints.
    Mapped { first: u64, fps: Vec<Fingerprint> },
    /// Blocks `first..first + count` read as zeros.
    Zero { first: u64, count: u64 },
}

impl Run {
    /// The fingerprints a listing's runs name, in order (zero runs name none).
    pub fn fingerprints(runs: Vec<Run>) -> Vec<Fingerprint> {
        runs.into_iter()
            .flat_map(|run| match run {
                Run::Mapped { fps, .. } => fps,
                Run::Zero { .. } => Vec::new(),
            })
            .collect()
    }

    pub fn blocks(&self) -> u64 {
        match self {
            Run::Mapped { fps, .. } => fps.len() as u64,
            Run::Zero { count, .. } => *count,
        }
    }
}

/// What the destination reports about itself (in SWITCHED, COMPLETE and PLAN).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestReport {
    /// Blocks the source listed as allocated.
    pub blocks_listed: u64,
    /// Blocks whose content the destination already had from other disks.
    pub neighbour_hits: u64,
    /// Blocks whose content occurs earlier in the same disk (crossed once).
    pub duplicates: u64,
    /// Blocks that read as zeros (never cross).
    pub zero_blocks: u64,
    /// Distinct fingerprints the destination asked for.
    pub wanted: u64,
    /// Distinct blocks received before the switch-over, on demand after it, in the
    /// background after it.
    pub received_before_switch: u64,
    pub fetched_on_demand: u64,
    pub fetched_background: u64,
    /// Fingerprints the source no longer had (the block changed; a later round resent it).
    pub gone: u64,
    /// Distinct contents this migration took from another migration of its gang (sent
    /// once, over that migration's link) instead of asking its own source.
    #[serde(default)]
    pub gang_shared: u64,
    /// Most blocks listed and not yet local at one time before the switch-over (what the
    /// destination's bookkeeping held; the listing window bounds it).
    #[serde(default)]
    pub missing_peak: u64,
    /// Blocks that arrived as deltas against a block held here, and deltas that could not
    /// be used (reference not held, or the result did not match its fingerprint), asked for
    /// whole again with REFETCH.
    #[serde(default)]
    pub delta_blocks: u64,
    #[serde(default)]
    pub delta_refetched: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Accept(AcceptInfo),
    /// The destination has applied this many sequenced messages (the source may forget them).
    Ack {
        processed: u64,
    },
    Fingerprints {
        round: u32,
        runs: Vec<Run>,
    },
    RoundEnd {
        round: u32,
        last: bool,
    },
    Want(Vec<Fingerprint>),
    Fetch(Vec<Fingerprint>),
    /// A zstd frame of block records (see [`crate::compress`]); `raw_len` is its size
    /// decompressed.
    Data {
        raw_len: u32,
        frame: Vec<u8>,
    },
    /// The next piece of this connection's zstd stream `stream` (0 background, 1 urgent),
    /// flushed: it decodes to `raw_len` bytes of block records given the pieces before it.
    DataStream {
        stream: u8,
        raw_len: u32,
        frame: Vec<u8>,
    },
    RoundDone {
        round: u32,
    },
    Switch,
    Switched(DestReport),
    Complete(DestReport),
    Plan(DestReport),
    Error(ErrorMessage),
    Bye,
    /// Destination to source, before the switch-over: the standby export needs these bytes
    /// of the disk as the source has them now (at most [`MAX_READ`] bytes).
    Read {
        id: u64,
        offset: u64,
        length: u32,
    },
    /// Source to destination: the answer to READ `id`.
    ReadData {
        id: u64,
        result: Result<Vec<u8>, String>,
    },
    /// Source to destination: does the destination hold these blocks (candidate references
    /// for deltas)? Answered by REF_HELD with the same `id`.
    RefQuery {
        id: u64,
        refs: Vec<Fingerprint>,
    },
    /// Destination to source: for each fingerprint of REF_QUERY `id`, in order, whether it
    /// is held here (a bitmap on the wire).
    RefHeld {
        id: u64,
        held: Vec<bool>,
    },
    /// Destination to source: these blocks arrived as deltas that could not be used; send
    /// them whole.
    Refetch(Vec<Fingerprint>),
    /// Destination to source: WANT for content listed in sequenced FINGERPRINTS frame `seq`,
    /// one flag per listed block of that frame (its runs' fingerprints, in order); only to a
    /// source whose HELLO says `want_listed`. See "Asking by position".
    WantListed {
        seq: u64,
        wanted: Vec<bool>,
    },
}

/// Largest READ (the standby export splits larger reads).
pub const MAX_READ: u32 = 1 << 20;

impl Message {
    /// Messages from the source that the destination counts and acknowledges: after a lost
    /// link the source resends those the destination had not applied. Everything else is
    /// either regenerated from state on resume (WANT, FETCH, DATA, ROUND_DONE, SWITCHED,
    /// COMPLETE) or belongs to one connection (HELLO, ACCEPT, ERROR).
    pub fn is_sequenced(&self) -> bool {
        matches!(self, Message::Fingerprints { .. } | Message::RoundEnd { .. } | Message::Switch | Message::Bye)
    }

    /// Name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "HELLO",
            Message::Accept(_) => "ACCEPT",
            Message::Ack { .. } => "ACK",
            Message::Fingerprints { .. } => "FINGERPRINTS",
            Message::RoundEnd { .. } => "ROUND_END",
            Message::Want(_) => "WANT",
            Message::Fetch(_) => "FETCH",
            Message::Data { .. } => "DATA",
            Message::DataStream { .. } => "DATA_STREAM",
            Message::RoundDone { .. } => "ROUND_DONE",
            Message::Switch => "SWITCH",
            Message::Switched(_) => "SWITCHED",
            Message::Complete(_) => "COMPLETE",
            Message::Plan(_) => "PLAN",
            Message::Error(_) => "ERROR",
            Message::Bye => "BYE",
            Message::Read { .. } => "READ",
            Message::ReadData { .. } => "READ_DATA",
            Message::RefQuery { .. } => "REF_QUERY",
            Message::RefHeld { .. } => "REF_HELD",
            Message::Refetch(_) => "REFETCH",
            Message::WantListed { .. } => "WANT_LISTED",
        }
    }
}
