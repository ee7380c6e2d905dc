//! Value types shared by the engine, the stores and the codecs: event keys, reasons, ids and the
//! records the engine emits. Nothing here does work; it only names things.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Event time or wall-clock time, in milliseconds since the Unix epoch.
pub type Millis = i64;

/// What role an event plays in sessionization, decided by the codec from its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventClass {
    /// An explicit start event (e.g. `app_open`): always opens a new session.
    Start,
    /// An ordinary engagement event.
    Engagement,
    /// An explicit end event (e.g. `app_close`): included, then closes the session.
    End,
    /// A non-engagement event: passed through, never sessionized.
    Excluded,
}

impl EventClass {
    /// Tie-break rank among events with the same time: starts first, ends last.
    pub(crate) fn rank(self) -> u8 {
        match self {
            EventClass::Start => 0,
            EventClass::Engagement | EventClass::Excluded => 1,
            EventClass::End => 2,
        }
    }
}

/// The canonical position of a sessionized event. Events of one scope key are ordered by
/// (time, rank, timeout, arrival number), which makes session boundaries independent of the
/// arrival order: events that tie on everything but the arrival number are interchangeable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EvKey {
    /// Event time (ms).
    pub t: Millis,
    /// 0 = start event, 1 = engagement, 2 = end event.
    pub rank: u8,
    /// Inactivity timeout that applies to the gap after this event (ms).
    pub timeout: Millis,
    /// Arrival number of the event within its scope key (1-based), the last tie-break.
    pub tie: u64,
}

impl EvKey {
    pub(crate) fn is_start(&self) -> bool {
        self.rank == 0
    }
    pub(crate) fn is_end(&self) -> bool {
        self.rank == 2
    }
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum EndReason {
    /// The gap to the next event exceeded the timeout, or nothing followed.
    Inactivity,
    /// The session's last event is a configured end event.
    ExplicitEnd,
    /// The next event is a configured start event, which always opens a new session.
    ExplicitStart,
    /// The next event would have made the session longer than the maximum length.
    MaxLength,
    /// The next event falls on another calendar day in the configured time zone.
    DayBoundary,
}

impl EndReason {
    pub const ALL: [EndReason; 5] = [
        EndReason::Inactivity,
        EndReason::ExplicitEnd,
        EndReason::ExplicitStart,
        EndReason::MaxLength,
        EndReason::DayBoundary,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Inactivity => "inactivity",
            EndReason::ExplicitEnd => "explicit_end",
            EndReason::ExplicitStart => "explicit_start",
            EndReason::MaxLength => "max_length",
            EndReason::DayBoundary => "day_boundary",
        }
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an event went to the late output instead of being sessionized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LateReason {
    /// It would join, merge with, split or change the end of a session already concluded.
    ConcludedSession,
    /// It is older than the partition time minus the lateness horizon.
    BeyondHorizon,
}

impl LateReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LateReason::ConcludedSession => "concluded_session",
            LateReason::BeyondHorizon => "beyond_horizon",
        }
    }
}

impl fmt::Display for LateReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A session id: deterministic, unique per scope key by construction (the key's session
/// counter) and across keys by a 64-bit hash of the scope key. Rendered as `<hash hex>-<n>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId {
    pub key_hash: u64,
    pub num: u64,
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{}", self.key_hash, self.num)
    }
}

/// Session information attached to an annotated event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Annotation {
    pub id: SessionId,
    /// 1-based position of the event in its session (by event time).
    pub seq: u32,
    /// True when the event is the session's first.
    pub start: bool,
}

/// What happened to the event given to [`crate::engine::Engine::process`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Publish the event now with this annotation (`None`: an excluded event, out of session).
    Annotated(Option<Annotation>),
    /// `on_close` mode: the event is held in the state store and will come back as
    /// [`Output::Released`] when its session concludes.
    Held,
    /// The event goes to the late output.
    Late(LateReason),
    /// The event's time is beyond the allowed clock skew and the policy is to dead-letter it.
    FutureTime,
}

/// A session that has ended for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConcludedSession {
    pub id: SessionId,
    pub key: String,
    pub user: String,
    /// First event time (ms).
    pub start: Millis,
    /// Last event time (ms).
    pub end: Millis,
    pub event_count: u64,
    pub end_reason: EndReason,
    /// The user's session number, in conclusion order: 1 for the first session concluded
    /// for this user (a session accepted late takes the next number; published ones stay).
    pub session_number: u64,
    /// Ids of sessions that were merged into this one (visible in `on_arrival` annotations).
    pub merged_ids: Vec<SessionId>,
    /// The user's stats after this conclusion (published on the stats output).
    pub stats: UserStats,
}

/// Per-user session statistics, updated at each conclusion.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserStats {
    pub first_session_start: Millis,
    pub last_session_start: Millis,
    /// Latest end of any concluded session of the user.
    pub last_session_end: Millis,
    pub session_count: u64,
    /// Sum of session lengths (ms), for the average.
    pub total_length_ms: i64,
    /// The latest start minus the latest end among the sessions that started strictly
    /// before it (ms); `None` while there are none.
    pub last_interval_ms: Option<i64>,
}

impl UserStats {
    pub fn avg_length_ms(&self) -> f64 {
        if self.session_count == 0 {
            0.0
        } else {
            self.total_length_ms as f64 / self.session_count as f64
        }
    }
}

/// Records the engine emits besides the disposition of the current event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A session concluded.
    Session(ConcludedSession),
    /// `on_arrival` mode: a late event bridged two open sessions; `absorbed` is now `into`.
    Merge {
        key: String,
        user: String,
        absorbed: SessionId,
        into: SessionId,
        /// Event time of the event that caused the merge.
        at: Millis,
    },
    /// `on_arrival` mode: a late event split an open session; events of `from` at or after
    /// `at` now belong to `to`.
    Split {
        key: String,
        user: String,
        from: SessionId,
        to: SessionId,
        at: Millis,
    },
    /// `on_close` mode: a held event, now final.
    Released {
        payload: Vec<u8>,
        time: Millis,
        annotation: Annotation,
    },
}
