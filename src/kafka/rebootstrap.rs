//! A workaround for librdkafka issue 5301 (open in 2.12 to 2.14). A Metadata response that
//! lists no brokers, which a restarted KRaft broker gives while it is still registering,
//! makes the client decommission every broker it knows. With none left it never sends a
//! Metadata request again, so its re-bootstrap timer (`metadata.recovery.rebootstrap.trigger.ms`)
//! never starts: a consumer never finds its group coordinator again, and a producer never
//! delivers. Seen here once in 12 runs of `E2E_ONLY=bounce` (a single-broker restart).
//!
//! [`BrokerLoss`] reads each statistics report of a client: when no configured or learned
//! broker is left, the next [`BrokerLoss::rebootstrap`] adds the bootstrap servers back, as
//! librdkafka's own re-bootstrap does, and the client starts over from them.

use rdkafka::client::{Client, ClientContext};
use rdkafka::statistics::Statistics;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether a client's last statistics report showed no broker left.
#[derive(Debug, Default)]
pub struct BrokerLoss {
    lost: AtomicBool,
}

/// Whether a statistics report lists no broker the client can connect to (only the logical
/// coordinator handles and the internal one).
pub fn no_broker_left(s: &Statistics) -> bool {
    !s.brokers
        .values()
        .any(|b| b.source == "learned" || b.source == "configured")
}

impl BrokerLoss {
    pub fn observe(&self, s: &Statistics) {
        self.lost.store(no_broker_left(s), Ordering::Relaxed);
    }

    /// If the last report showed no broker left, adds `bootstrap` (the `bootstrap.servers`
    /// list) back to `client`. Returns whether it did.
    pub fn rebootstrap<C: ClientContext>(&self, client: &Client<C>, bootstrap: &str) -> bool {
        if !self.lost.swap(false, Ordering::Relaxed) {
            return false;
        }
        let Ok(list) = CString::new(bootstrap) else {
            return false;
        };
        // SAFETY: the handle is valid while `client` lives; rd_kafka_brokers_add is
        // thread-safe and copies the list.
        let added =
            unsafe { rdkafka::bindings::rd_kafka_brokers_add(client.native_ptr(), list.as_ptr()) };
        tracing::warn!(
            brokers = bootstrap,
            added,
            "the Kafka client had no broker left (librdkafka issue 5301): bootstrap servers \
             added again"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::statistics::Broker;

    fn stats(brokers: &[(&str, &str)]) -> Statistics {
        Statistics {
            brokers: brokers
                .iter()
                .map(|(name, source)| {
                    let b = Broker {
                        name: name.to_string(),
                        source: source.to_string(),
                        ..Broker::default()
                    };
                    (name.to_string(), b)
                })
                .collect(),
            ..Statistics::default()
        }
    }

    #[test]
    fn only_coordinator_handles_left_means_no_broker() {
        assert!(no_broker_left(&stats(&[
            ("GroupCoordinator", "logical"),
            (":0/internal", "internal"),
        ])));
        assert!(no_broker_left(&stats(&[])));
    }

    #[test]
    fn a_learned_or_configured_broker_is_enough() {
        assert!(!no_broker_left(&stats(&[
            ("GroupCoordinator", "logical"),
            ("127.0.0.1:9092/1", "learned"),
        ])));
        assert!(!no_broker_left(&stats(&[(
            "127.0.0.1:9092/bootstrap",
            "configured"
        )])));
    }

    #[test]
    fn the_flag_follows_the_last_report() {
        let w = BrokerLoss::default();
        w.observe(&stats(&[("GroupCoordinator", "logical")]));
        assert!(w.lost.load(Ordering::Relaxed));
        w.observe(&stats(&[("127.0.0.1:9092/1", "learned")]));
        assert!(!w.lost.load(Ordering::Relaxed));
    }
}
