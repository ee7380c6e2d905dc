//! The changelog form of the RocksDB state: every write of a commit as one Kafka record.
//!
//! A record's key is a one-byte column-family code followed by the RocksDB key in that family;
//! its value is the RocksDB value, or none (a tombstone) for a delete. Timer entries have an
//! empty value, never none. Compaction therefore keeps exactly the latest value of every
//! RocksDB key, and replaying a changelog partition from any offset onto a database that was
//! at that offset reproduces the database.
//!
//! Commits. The last record of every commit is the partition meta record (input offsets,
//! watermark). Every commit reaches the changelog in a Kafka transaction, so a read_committed
//! reader never sees part of one, and a restore applies every record it reads.

/// One changelog record: the encoded key and the value (none = delete).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

impl Change {
    /// Bytes of its key and value (what `sessionizer_changelog_bytes_total` counts).
    pub fn bytes(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Vec::len)
    }
}

/// Column-family codes (the first key byte).
pub(crate) const CF_CODES: [(u8, &str); 7] = [
    (0, super::rocks::CF_KEYS),
    (1, super::rocks::CF_STATS),
    (2, super::rocks::CF_DEADLINE),
    (3, super::rocks::CF_QUIET),
    (4, super::rocks::CF_PAYLOADS),
    (5, super::rocks::CF_META),
    (6, super::rocks::CF_CHUNKS),
];

pub(crate) fn code_of(cf: &str) -> u8 {
    CF_CODES
        .iter()
        .find(|(_, name)| *name == cf)
        .map(|(c, _)| *c)
        .unwrap_or(u8::MAX)
}

pub(crate) fn cf_of(code: u8) -> Option<&'static str> {
    CF_CODES.iter().find(|(c, _)| *c == code).map(|(_, n)| *n)
}

/// The changelog key of RocksDB key `key` in column family `cf`.
pub(crate) fn change_key(cf: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(code_of(cf));
    k.extend_from_slice(key);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for (code, name) in CF_CODES {
            assert_eq!(cf_of(code_of(name)), Some(name));
            assert_eq!(change_key(name, b"k")[0], code);
        }
    }
}
