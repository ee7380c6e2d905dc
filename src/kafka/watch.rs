//! A diagnostic over the consumer's statistics: assigned input partitions with stable records
//! beyond the fetch position, nothing queued for the application, and a fetch position that
//! has not moved for
//! [`STALL_AFTER`]. librdkafka normally resumes fetching by itself (new leaders after a broker
//! failure, for instance); this reports what the client says about a partition when it
//! does not, so that a stall can be told apart from a stuck pipeline thread (which would
//! not serve the statistics at all).

use rdkafka::statistics::Statistics;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a partition may have lag without being fetched before it is reported (and again
/// after as long, while it lasts).
pub const STALL_AFTER: Duration = Duration::from_secs(30);

/// What the client reports about a stalled partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stall {
    pub topic: String,
    pub partition: i32,
    pub fetch_state: String,
    pub leader: i32,
    pub next_offset: i64,
    /// Stable records beyond the fetch position.
    pub behind: i64,
    pub stalled: Duration,
}

#[derive(Debug)]
struct Watched {
    next_offset: i64,
    since: Instant,
    reported: Option<Instant>,
}

/// The fetch positions seen so far, per (topic, partition).
#[derive(Debug, Default)]
pub struct FetchWatch {
    seen: HashMap<(String, i32), Watched>,
}

impl FetchWatch {
    /// Takes one statistics report (received at `now`) and returns the partitions to report.
    pub fn observe(&mut self, s: &Statistics, now: Instant) -> Vec<Stall> {
        let mut out = Vec::new();
        for (topic, t) in &s.topics {
            for (&p, part) in &t.partitions {
                if p < 0 || !part.desired {
                    continue;
                }
                let w = self
                    .seen
                    .entry((topic.clone(), p))
                    .or_insert_with(|| Watched {
                        next_offset: part.next_offset,
                        since: now,
                        reported: None,
                    });
                // Not the client's consumer_lag: that counts from the committed offset, which
                // offsets committed in transactions do not update.
                let behind = part.ls_offset - part.next_offset;
                let idle = part.next_offset >= 0 && behind > 0 && part.fetchq_cnt == 0;
                if !idle || part.next_offset != w.next_offset {
                    *w = Watched {
                        next_offset: part.next_offset,
                        since: now,
                        reported: None,
                    };
                    continue;
                }
                let stalled = now.saturating_duration_since(w.since);
                let due = w
                    .reported
                    .is_none_or(|r| now.saturating_duration_since(r) >= STALL_AFTER);
                if stalled >= STALL_AFTER && due {
                    w.reported = Some(now);
                    out.push(Stall {
                        topic: topic.clone(),
                        partition: p,
                        fetch_state: part.fetch_state.clone(),
                        leader: part.leader,
                        next_offset: part.next_offset,
                        behind,
                        stalled,
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::statistics::{Partition, Topic};

    /// Fetch position `next_offset`, `behind` stable records beyond it, `queued` fetched.
    fn stats(next_offset: i64, behind: i64, queued: i64) -> Statistics {
        let part = Partition {
            partition: 0,
            desired: true,
            next_offset,
            ls_offset: next_offset + behind,
            fetchq_cnt: queued,
            fetch_state: "active".into(),
            ..Partition::default()
        };
        let topic = Topic {
            topic: "in".into(),
            partitions: [(0, part)].into_iter().collect(),
            ..Topic::default()
        };
        Statistics {
            topics: [("in".to_owned(), topic)].into_iter().collect(),
            ..Statistics::default()
        }
    }

    #[test]
    fn a_partition_behind_that_does_not_move_is_reported_once_per_period() {
        let mut w = FetchWatch::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(w.observe(&stats(10, 5, 0), at(0)).is_empty());
        assert!(w.observe(&stats(10, 5, 0), at(29)).is_empty());
        let r = w.observe(&stats(10, 5, 0), at(30));
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].partition, r[0].next_offset), (0, 10));
        assert!(
            w.observe(&stats(10, 5, 0), at(45)).is_empty(),
            "not again at once"
        );
        assert_eq!(
            w.observe(&stats(10, 5, 0), at(60)).len(),
            1,
            "again a period later"
        );
    }

    #[test]
    fn progress_caught_up_or_queued_records_are_not_stalls() {
        let mut w = FetchWatch::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        w.observe(&stats(10, 5, 0), at(0));
        assert!(w.observe(&stats(11, 5, 0), at(40)).is_empty(), "moved");
        assert!(w.observe(&stats(11, 0, 0), at(80)).is_empty(), "caught up");
        assert!(
            w.observe(&stats(11, 5, 3), at(120)).is_empty(),
            "records queued"
        );
        assert!(
            w.observe(&stats(11, 5, 0), at(149)).is_empty(),
            "period restarted"
        );
        assert_eq!(w.observe(&stats(11, 5, 0), at(150)).len(), 1);
    }
}
