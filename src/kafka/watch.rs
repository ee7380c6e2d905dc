//! What the consumer's statistics say about the input partitions:
//! - a diagnostic of assigned partitions with stable records beyond the fetch position,
//!   nothing queued for the application, and a fetch position that has not moved for
//!   [`STALL_AFTER`]. librdkafka normally resumes fetching by itself (new leaders after a
//!   broker failure, for instance); this reports what the client says about a partition when
//!   it does not, so that a stall can be told apart from a stuck pipeline thread (which would
//!   not serve the statistics at all);
//! - [`lagging_partitions`]: the partition numbers that have records left to fetch;
//! - [`consumer_lags`]: the records of each assigned partition not yet taken by the
//!   application.

use rdkafka::statistics::{Partition, Statistics};
use std::collections::{HashMap, HashSet};
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

impl Watched {
    fn new(next_offset: i64, now: Instant) -> Self {
        Watched {
            next_offset,
            since: now,
            reported: None,
        }
    }
}

/// The fetch positions of the partitions in the last report, per (topic, partition): a
/// partition revoked and assigned again starts afresh.
#[derive(Debug, Default)]
pub struct FetchWatch {
    seen: HashMap<(String, i32), Watched>,
}

impl FetchWatch {
    /// Takes one statistics report (received at `now`) and returns the partitions to report.
    pub fn observe(&mut self, s: &Statistics, now: Instant) -> Vec<Stall> {
        let mut out = Vec::new();
        let mut seen = HashMap::with_capacity(self.seen.len());
        for (topic, p, part) in assigned(s) {
            let key = (topic.to_owned(), p);
            // Not the client's consumer_lag: that counts from the committed offset, which
            // offsets committed in transactions do not update.
            let behind = part.ls_offset - part.next_offset;
            let idle = part.next_offset >= 0 && behind > 0 && part.fetchq_cnt == 0;
            let mut w = match self.seen.remove(&key) {
                Some(w) if idle && w.next_offset == part.next_offset => w,
                _ => Watched::new(part.next_offset, now),
            };
            let stalled = now.saturating_duration_since(w.since);
            let due = w
                .reported
                .is_none_or(|r| now.saturating_duration_since(r) >= STALL_AFTER);
            if idle && stalled >= STALL_AFTER && due {
                w.reported = Some(now);
                out.push(Stall {
                    topic: topic.to_owned(),
                    partition: p,
                    fetch_state: part.fetch_state.clone(),
                    leader: part.leader,
                    next_offset: part.next_offset,
                    behind,
                    stalled,
                });
            }
            seen.insert(key, w);
        }
        self.seen = seen;
        out
    }
}

/// The partition numbers of which some assigned topic-partition has stable records beyond its
/// fetch position. With several input topics, reaching the end of one of them says nothing
/// of the others (librdkafka's end-of-partition event reaches the application without its
/// topic), so a task counts as caught up only if its partition number is not among these as
/// of the last report (at most `statistics.interval.ms` old).
pub fn lagging_partitions(s: &Statistics) -> HashSet<i32> {
    assigned(s)
        .filter(|(_, _, part)| part.next_offset >= 0 && part.ls_offset > part.next_offset)
        .map(|(_, p, _)| p)
        .collect()
}

/// The consumer lag of each assigned input partition, `(topic, partition, records)`: the
/// records between the last one handed to the application and the partition's end (its last
/// stable offset, which read_committed reads up to; the high watermark if the report has
/// none). Before the application has taken a record of it, the fetch position stands for
/// the application's. Not the client's own `consumer_lag`: that counts from the offset the
/// consumer committed, which offsets committed in transactions never update, so it stays
/// unknown (-1). A partition whose position or end is not known yet is left out.
pub fn consumer_lags(s: &Statistics) -> Vec<(&str, i32, i64)> {
    assigned(s)
        .filter_map(|(topic, p, part)| {
            let end = if part.ls_offset >= 0 {
                part.ls_offset
            } else {
                part.hi_offset
            };
            let taken = if part.app_offset >= 0 {
                part.app_offset
            } else {
                part.next_offset
            };
            (end >= 0 && taken >= 0).then(|| (topic, p, (end - taken).max(0)))
        })
        .collect()
}

/// The partitions of a report assigned to this consumer, `(topic, partition, statistics)`
/// (the report also lists partitions it only knows of, and the internal partition -1).
fn assigned(s: &Statistics) -> impl Iterator<Item = (&str, i32, &Partition)> {
    s.topics.iter().flat_map(|(topic, t)| {
        t.partitions
            .iter()
            .filter(|(&p, part)| p >= 0 && part.desired)
            .map(move |(&p, part)| (topic.as_str(), p, part))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::statistics::Topic;

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

    /// Feeds reports `(second, next_offset, behind, queued, assigned)` to a fresh watch;
    /// what each returned.
    fn replay(steps: &[(u64, i64, i64, i64, bool)]) -> Vec<Vec<Stall>> {
        let mut w = FetchWatch::default();
        let t0 = Instant::now();
        steps
            .iter()
            .map(|&(at, next, behind, queued, assigned)| {
                let mut s = stats(next, behind, queued);
                for t in s.topics.values_mut() {
                    t.partitions.values_mut().for_each(|p| p.desired = assigned);
                }
                w.observe(&s, t0 + Duration::from_secs(at))
            })
            .collect()
    }

    fn counts(r: &[Vec<Stall>]) -> Vec<usize> {
        r.iter().map(Vec::len).collect()
    }

    #[test]
    fn a_partition_behind_that_does_not_move_is_reported_once_per_period() {
        let r = replay(&[
            (0, 10, 5, 0, true),
            (29, 10, 5, 0, true),
            (30, 10, 5, 0, true),
            (45, 10, 5, 0, true),
            (60, 10, 5, 0, true),
        ]);
        // Not before 30 s, not again at once, again a period later.
        assert_eq!(counts(&r), vec![0, 0, 1, 0, 1]);
        assert_eq!((r[2][0].partition, r[2][0].next_offset), (0, 10));
    }

    #[test]
    fn progress_caught_up_or_queued_records_are_not_stalls() {
        let r = replay(&[
            (0, 10, 5, 0, true),
            (40, 11, 5, 0, true),  // moved
            (80, 11, 0, 0, true),  // caught up
            (120, 11, 5, 3, true), // records queued
            (149, 11, 5, 0, true), // the period restarted at 120
            (150, 11, 5, 0, true),
        ]);
        assert_eq!(counts(&r), vec![0, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn lagging_partitions_are_those_with_records_beyond_the_fetch_position() {
        let mut s = stats(10, 5, 0);
        let mut other = s.topics["in"].clone();
        other.topic = "other".into();
        for p in other.partitions.values_mut() {
            p.ls_offset = p.next_offset; // at its end
        }
        s.topics.insert("other".into(), other);
        assert_eq!(lagging_partitions(&s), HashSet::from([0]), "`in` is behind");
        for t in s.topics.values_mut() {
            for p in t.partitions.values_mut() {
                p.ls_offset = p.next_offset;
            }
        }
        assert!(lagging_partitions(&s).is_empty(), "both at their end");
        let s = stats(-1001, 5, 0); // no fetch position yet
        assert!(lagging_partitions(&s).is_empty());
        let mut s = stats(10, 5, 0);
        s.topics.values_mut().for_each(|t| {
            t.partitions.values_mut().for_each(|p| p.desired = false);
        });
        assert!(lagging_partitions(&s).is_empty(), "not assigned");
    }

    #[test]
    fn consumer_lag_counts_from_the_last_record_taken_to_the_stable_end() {
        let lag = |edit: &dyn Fn(&mut Partition)| {
            let mut s = stats(10, 5, 0);
            s.topics.values_mut().for_each(|t| {
                t.partitions.values_mut().for_each(|p| {
                    p.app_offset = -1001;
                    p.hi_offset = p.ls_offset + 2; // an open transaction beyond the stable end
                    p.consumer_lag = -1; // what the client reports with transactional commits
                    edit(p);
                })
            });
            consumer_lags(&s)
                .into_iter()
                .map(|(t, p, n)| (t.to_owned(), p, n))
                .collect::<Vec<_>>()
        };
        let lags = |n| vec![("in".to_owned(), 0, n)];
        // Nothing taken yet: from the fetch position (10) to the stable end (15).
        assert_eq!(lag(&|_| {}), lags(5));
        // Records fetched ahead of the application still count.
        assert_eq!(lag(&|p| p.app_offset = 7), lags(8));
        assert_eq!(lag(&|p| p.app_offset = 15), lags(0));
        // No stable offset in the report: the high watermark.
        assert_eq!(lag(&|p| p.ls_offset = -1001), lags(7));
        // Unknown position, unknown end, or not assigned: left out.
        assert_eq!(lag(&|p| p.next_offset = -1001), vec![]);
        assert_eq!(
            lag(&|p| {
                p.ls_offset = -1001;
                p.hi_offset = -1001;
            }),
            vec![]
        );
        assert_eq!(lag(&|p| p.desired = false), vec![]);
    }

    #[test]
    fn a_partition_assigned_again_starts_afresh() {
        let r = replay(&[
            (0, 10, 5, 0, true),
            (20, 10, 5, 0, false), // revoked
            (40, 10, 5, 0, true),  // assigned again, same position
            (69, 10, 5, 0, true),
            (70, 10, 5, 0, true),
        ]);
        assert_eq!(counts(&r), vec![0, 0, 0, 0, 1]);
    }
}
