//! Event-time watermark of one task: a small pure value.
//!
//! Each input source (topic partition) of the task tracks the largest event time it has seen
//! and when (wall clock) it last delivered an event. The watermark is the minimum over the
//! sources that are not idle of (max event time - allowed lateness); it never goes back. When
//! the task is caught up, some source has delivered an event, and every source has been idle
//! for `idle_after`, the watermark moves up to `now - allowed lateness`, so a quiet partition
//! still concludes its sessions. A task that has seen no event has nothing to conclude and
//! never follows the wall clock: the first events of a partition that was empty when the task
//! opened (a backfill of old data, say) must not meet a watermark of "now".

use super::types::Millis;
use serde::{Deserialize, Serialize};

/// Parameters of the watermark, from the validated configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatermarkParams {
    pub allowed_lateness: Millis,
    pub idle_after: Millis,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SourceClock {
    source: u32,
    max_time: Millis,
    last_arrival: Millis,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    sources: Vec<SourceClock>,
    current: Option<Millis>,
}

impl Watermark {
    /// The watermark, `i64::MIN` before the first event.
    pub fn get(&self) -> Millis {
        self.current.unwrap_or(Millis::MIN)
    }

    /// The task's notion of "current event time": watermark + allowed lateness.
    pub fn partition_time(&self, p: &WatermarkParams) -> Option<Millis> {
        self.current.map(|w| w.saturating_add(p.allowed_lateness))
    }

    /// Declares a source before it delivers anything (a task reading several topics): until it
    /// delivers or has been idle for `idle_after` since `now`, it holds the watermark back,
    /// so a topic read ahead of another cannot make the other's events late.
    pub fn expect_source(&mut self, source: u32, now: Millis) {
        if !self.sources.iter().any(|s| s.source == source) {
            self.sources.push(SourceClock {
                source,
                max_time: Millis::MIN,
                last_arrival: now,
            });
        }
    }

    /// Records an event of `source` with event time `t`, arriving at wall-clock `now`.
    pub fn observe(&mut self, source: u32, t: Millis, now: Millis, p: &WatermarkParams) {
        if let [only] = self.sources.as_mut_slice() {
            if only.source == source {
                // One source, which is active since it just delivered: it alone decides.
                only.max_time = only.max_time.max(t);
                only.last_arrival = only.last_arrival.max(now);
                let w = only.max_time.saturating_sub(p.allowed_lateness);
                self.raise(w);
                return;
            }
        }
        match self.sources.iter_mut().find(|s| s.source == source) {
            Some(s) => {
                s.max_time = s.max_time.max(t);
                s.last_arrival = s.last_arrival.max(now);
            }
            None => self.sources.push(SourceClock {
                source,
                max_time: t,
                last_arrival: now,
            }),
        }
        self.recompute(now, p);
    }

    /// Moves the watermark on with wall-clock time: idle sources stop holding it back, and a
    /// caught-up task whose sources are all idle, one of which has delivered an event,
    /// advances it to `now - allowed lateness`.
    pub fn advance(&mut self, now: Millis, caught_up: bool, p: &WatermarkParams) {
        self.recompute(now, p);
        // Not `all` alone: it holds for no sources at all, and a task that has seen nothing
        // would jump to the wall clock on its first end-of-partition, making every later
        // event of an older input late.
        let delivered = self.sources.iter().any(|s| s.max_time != Millis::MIN);
        let all_idle = self
            .sources
            .iter()
            .all(|s| now.saturating_sub(s.last_arrival) >= p.idle_after);
        if caught_up && delivered && all_idle {
            self.raise(now.saturating_sub(p.allowed_lateness));
        }
    }

    /// For a watermark read back from stored state: one that no delivered event stands for
    /// is dropped. Builds before the rule above could raise an empty task's watermark to the
    /// wall clock; with no event seen, no session or timer depends on it.
    pub fn restored(mut self) -> Self {
        if !self.sources.iter().any(|s| s.max_time != Millis::MIN) {
            self.current = None;
        }
        self
    }

    fn recompute(&mut self, now: Millis, p: &WatermarkParams) {
        let active = self
            .sources
            .iter()
            .filter(|s| now.saturating_sub(s.last_arrival) < p.idle_after)
            .map(|s| s.max_time.saturating_sub(p.allowed_lateness))
            .min();
        // With every source idle, the most advanced one speaks for the task.
        let candidate = active.or_else(|| {
            self.sources
                .iter()
                .map(|s| s.max_time.saturating_sub(p.allowed_lateness))
                .max()
        });
        if let Some(c) = candidate {
            self.raise(c);
        }
    }

    fn raise(&mut self, w: Millis) {
        // `MIN` carries no information (a source that has not delivered yet).
        if w != Millis::MIN {
            self.current = Some(self.current.map_or(w, |c| c.max(w)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: WatermarkParams = WatermarkParams {
        allowed_lateness: 100,
        idle_after: 1_000,
    };

    #[test]
    fn starts_at_minus_infinity_and_follows_max_time() {
        let mut w = Watermark::default();
        assert_eq!(w.get(), i64::MIN);
        w.observe(0, 5_000, 0, &P);
        assert_eq!(w.get(), 4_900);
        w.observe(0, 4_000, 1, &P);
        assert_eq!(w.get(), 4_900, "never goes back");
        w.observe(0, 6_000, 2, &P);
        assert_eq!(w.get(), 5_900);
    }

    #[test]
    fn minimum_over_active_sources_ignoring_idle_ones() {
        let mut w = Watermark::default();
        w.observe(0, 10_000, 0, &P);
        w.observe(1, 2_000, 0, &P);
        assert_eq!(
            w.get(),
            9_900,
            "first source alone set it before the second arrived"
        );
        w.observe(0, 12_000, 10, &P);
        assert_eq!(w.get(), 9_900, "held back by source 1");
        // Source 1 idle: source 0 alone decides.
        w.observe(0, 13_000, 2_000, &P);
        assert_eq!(w.get(), 12_900);
    }

    #[test]
    fn an_expected_source_holds_the_watermark_until_it_delivers_or_idles() {
        let mut w = Watermark::default();
        w.expect_source(0, 0);
        w.expect_source(1, 0);
        w.observe(0, 50_000, 10, &P);
        assert_eq!(w.get(), Millis::MIN, "source 1 has delivered nothing yet");
        w.observe(1, 20_000, 20, &P);
        assert_eq!(
            w.get(),
            20_000 - P.allowed_lateness,
            "the slower source decides"
        );
        let mut w = Watermark::default();
        w.expect_source(0, 0);
        w.expect_source(1, 0);
        w.observe(0, 50_000, 10, &P);
        w.advance(P.idle_after / 2, false, &P);
        assert_eq!(w.get(), Millis::MIN, "source 1 is silent but not idle yet");
        w.advance(P.idle_after + 5, false, &P);
        assert_eq!(
            w.get(),
            50_000 - P.allowed_lateness,
            "source 1 idle: source 0 decides"
        );
    }

    #[test]
    fn idle_caught_up_task_advances_to_now_minus_lateness() {
        let mut w = Watermark::default();
        w.observe(0, 10_000, 10_000, &P);
        w.advance(10_500, true, &P);
        assert_eq!(w.get(), 9_900, "not idle long enough");
        w.advance(50_000, false, &P);
        assert_eq!(
            w.get(),
            9_900,
            "a lagging task never advances by wall clock"
        );
        w.advance(50_000, true, &P);
        assert_eq!(w.get(), 49_900);
    }

    #[test]
    fn a_task_that_has_seen_nothing_never_follows_the_wall_clock() {
        let mut w = Watermark::default();
        w.advance(50_000, true, &P);
        assert_eq!(w.get(), Millis::MIN, "no source: nothing to conclude");
        w.expect_source(0, 0);
        w.expect_source(1, 0);
        w.advance(50_000, true, &P);
        assert_eq!(
            w.get(),
            Millis::MIN,
            "expected sources that never delivered"
        );
        // The first event, however old, meets no watermark and moves it itself.
        w.observe(0, 5_000, 50_001, &P);
        assert_eq!(
            w.get(),
            4_900,
            "source 1, silent for long, is idle: source 0 decides"
        );
        w.advance(60_000, true, &P);
        assert_eq!(
            w.get(),
            59_900,
            "both idle, one has delivered: the wall clock"
        );
    }

    #[test]
    fn a_stored_watermark_without_a_delivered_event_is_dropped() {
        let stale = Watermark {
            sources: vec![],
            current: Some(1_795_000_000_000),
        };
        assert_eq!(stale.restored().get(), Millis::MIN);
        let mut w = Watermark::default();
        w.observe(0, 5_000, 0, &P);
        assert_eq!(w.clone().restored(), w, "a founded one is kept");
    }
}
