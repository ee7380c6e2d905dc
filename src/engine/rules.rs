//! The engine's validated parameters and the session boundary rule.
//!
//! [`Boundaries::between`] is the one place that decides whether two consecutive events of a
//! scope key belong to the same session, and if not, why the first one's session ended.

use super::types::{EndReason, EvKey, Millis};
use super::watermark::WatermarkParams;
use chrono::{Datelike, TimeZone};
use chrono_tz::Tz;

/// How annotated events are published.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnnotateMode {
    /// Annotate each event as soon as it is processed, given everything seen so far.
    OnArrival,
    /// Hold events until their session concludes, then publish them with final ids/positions.
    OnClose,
}

/// What to do with an event whose time is beyond `now + max_future_skew`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FuturePolicy {
    /// Send it to the dead-letter output.
    DeadLetter,
    /// Treat its time as the arrival time ("now").
    Clamp,
}

/// Everything the engine needs to know, validated (see `crate::config`).
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// How far behind the largest event time the watermark trails.
    pub allowed_lateness: Millis,
    /// Events older than partition time minus this are late (`beyond_horizon`).
    pub lateness_horizon: Millis,
    /// A session concludes only after no event joined it for this long (wall clock).
    pub quiet_period: Millis,
    /// A caught-up task whose sources delivered nothing for this long advances its watermark
    /// with the wall clock.
    pub idle_after: Millis,
    /// Events more than this ahead of "now" are handled by `future_policy`.
    pub max_future_skew: Millis,
    pub future_policy: FuturePolicy,
    pub annotate: AnnotateMode,
    /// Optional maximum session length (end - start); a longer run is split.
    pub max_length: Option<Millis>,
    /// Optional time zone whose midnights split sessions.
    pub day_boundary: Option<Tz>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            allowed_lateness: 60_000,
            lateness_horizon: 72 * 3_600_000,
            quiet_period: 5_000,
            idle_after: 10_000,
            max_future_skew: 3_600_000,
            future_policy: FuturePolicy::DeadLetter,
            annotate: AnnotateMode::OnArrival,
            max_length: None,
            day_boundary: None,
        }
    }
}

impl EngineConfig {
    pub fn watermark_params(&self) -> WatermarkParams {
        WatermarkParams {
            allowed_lateness: self.allowed_lateness,
            idle_after: self.idle_after,
        }
    }

    pub(crate) fn boundaries(&self) -> Boundaries {
        Boundaries {
            max_length: self.max_length,
            day: self.day_boundary,
        }
    }
}

/// The split rule between consecutive events.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Boundaries {
    pub max_length: Option<Millis>,
    pub day: Option<Tz>,
}

impl Boundaries {
    /// Whether `b`, the event right after `a` in canonical order, starts a new session, and
    /// if so why `a`'s session ended. `chain_start` is the first event time of `a`'s session.
    ///
    /// Rules, first match wins: `a` is an end event; the gap exceeds `a`'s timeout (a gap
    /// exactly equal stays); `b` is a start event; `b` is on another local day; `b` would make
    /// the session longer than the maximum length.
    pub fn between(&self, a: &EvKey, b: &EvKey, chain_start: Millis) -> Option<EndReason> {
        if a.is_end() {
            return Some(EndReason::ExplicitEnd);
        }
        if b.t - a.t > a.timeout {
            return Some(EndReason::Inactivity);
        }
        if b.is_start() {
            return Some(EndReason::ExplicitStart);
        }
        if let Some(tz) = self.day {
            if b.t != a.t && local_day(tz, a.t) != local_day(tz, b.t) {
                return Some(EndReason::DayBoundary);
            }
        }
        if let Some(max) = self.max_length {
            if b.t - chain_start > max {
                return Some(EndReason::MaxLength);
            }
        }
        None
    }
}

/// The calendar day (days since 0001-01-01) of instant `t` in `tz`.
pub fn local_day(tz: Tz, t: Millis) -> i32 {
    match tz.timestamp_millis_opt(t) {
        chrono::LocalResult::Single(dt) => dt.date_naive().num_days_from_ce(),
        chrono::LocalResult::Ambiguous(dt, _) => dt.date_naive().num_days_from_ce(),
        // An instant always maps to one local time; keep a total function anyway.
        chrono::LocalResult::None => (t.div_euclid(86_400_000)) as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: Millis, rank: u8, timeout: Millis) -> EvKey {
        EvKey {
            t,
            rank,
            timeout,
            tie: 0,
        }
    }

    #[test]
    fn gap_equal_to_timeout_stays_greater_splits() {
        let b = Boundaries {
            max_length: None,
            day: None,
        };
        assert_eq!(b.between(&ev(0, 1, 100), &ev(100, 1, 100), 0), None);
        assert_eq!(
            b.between(&ev(0, 1, 100), &ev(101, 1, 100), 0),
            Some(EndReason::Inactivity)
        );
    }

    #[test]
    fn explicit_events_and_priorities() {
        let b = Boundaries {
            max_length: Some(1_000),
            day: None,
        };
        assert_eq!(
            b.between(&ev(0, 2, 100), &ev(500, 0, 100), 0),
            Some(EndReason::ExplicitEnd),
            "end wins over inactivity and start"
        );
        assert_eq!(
            b.between(&ev(0, 1, 100), &ev(50, 0, 100), 0),
            Some(EndReason::ExplicitStart)
        );
        assert_eq!(b.between(&ev(900, 1, 100), &ev(1_000, 1, 100), 0), None);
        assert_eq!(
            b.between(&ev(950, 1, 100), &ev(1_001, 1, 100), 0),
            Some(EndReason::MaxLength)
        );
    }

    #[test]
    fn day_boundary_is_dst_correct() {
        // Europe/Berlin switches to summer time on 2024-03-31 at 02:00 local (01:00 UTC):
        // local midnight of 2024-04-01 is 2024-03-31T22:00Z, not 23:00Z.
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let b = Boundaries {
            max_length: None,
            day: Some(tz),
        };
        let t_2150z = 1_711_921_800_000; // 2024-03-31T21:50:00Z = 23:50 CEST
        let t_2210z = 1_711_923_000_000; // 2024-03-31T22:10:00Z = 00:10 CEST on April 1st
        let t_2250z = 1_711_925_400_000; // 2024-03-31T22:50:00Z
        assert_eq!(
            b.between(
                &ev(t_2150z, 1, 3_600_000),
                &ev(t_2210z, 1, 3_600_000),
                t_2150z
            ),
            Some(EndReason::DayBoundary)
        );
        assert_eq!(
            b.between(
                &ev(t_2210z, 1, 3_600_000),
                &ev(t_2250z, 1, 3_600_000),
                t_2210z
            ),
            None,
            "23:00Z is not the Berlin midnight in summer time"
        );
    }
}
