//! Byte layouts of the RocksDB store: compact, order-preserving encodings of the composite keys
//! (timer entries, payload ids, input offsets) and the `postcard` (de)serialization of values.
//!
//! * timer key: `at` as 8 bytes big-endian with the sign bit flipped (so byte order is numeric
//!   order, negatives included), then the scope key bytes. Byte order of encoded keys equals
//!   the order of `(at, key)` tuples.
//! * payload key: scope key length as `u16` big-endian, the scope key bytes, `tie` as `u64`
//!   big-endian.
//! * chunk key: scope key length as `u16` big-endian, the scope key bytes, the session number
//!   as `u64` big-endian, the chunk index as `u32` big-endian.
//! * offset key: topic bytes, `0x00`, partition as `i32` big-endian with the sign bit flipped.
//!
//! Every decoding failure is a [`StoreError::Corrupt`] naming the table it came from.

use crate::engine::{Millis, StoreError};
use serde::{de::DeserializeOwned, Serialize};

const I64_SIGN: u64 = 1 << 63;
const I32_SIGN: u32 = 1 << 31;

/// The error for a record of `table` that cannot be read.
pub(crate) fn corrupt(table: &'static str, detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        table,
        detail: detail.into(),
    }
}

/// Serializes a value with `postcard`.
pub(crate) fn encode_value<T: Serialize>(
    table: &'static str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(value).map_err(|e| corrupt(table, format!("cannot encode: {e}")))
}

/// Deserializes a `postcard` value read from `table`.
pub(crate) fn decode_value<T: DeserializeOwned>(
    table: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| corrupt(table, format!("cannot decode value: {e}")))
}

/// Deserializes a `postcard` value at the start of `bytes` read from `table`; returns it and
/// the bytes after it.
pub(crate) fn take_value<'a, T: DeserializeOwned>(
    table: &'static str,
    bytes: &'a [u8],
) -> Result<(T, &'a [u8]), StoreError> {
    postcard::take_from_bytes(bytes)
        .map_err(|e| corrupt(table, format!("cannot decode value: {e}")))
}

/// The order-preserving 8-byte form of an `i64`.
fn i64_key(v: i64) -> [u8; 8] {
    ((v as u64) ^ I64_SIGN).to_be_bytes()
}

fn i64_from_key(b: [u8; 8]) -> i64 {
    (u64::from_be_bytes(b) ^ I64_SIGN) as i64
}

fn utf8(table: &'static str, bytes: &[u8]) -> Result<String, StoreError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|e| corrupt(table, format!("key is not UTF-8: {e}")))
}

/// Key of the timer entry `(at, key)`.
pub(crate) fn timer_key(at: Millis, key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + key.len());
    out.extend_from_slice(&i64_key(at));
    out.extend_from_slice(key.as_bytes());
    out
}

/// Inverse of [`timer_key`].
pub(crate) fn decode_timer_key(
    table: &'static str,
    bytes: &[u8],
) -> Result<(Millis, String), StoreError> {
    let (at, key) = bytes
        .split_first_chunk::<8>()
        .ok_or_else(|| corrupt(table, format!("timer key of {} bytes", bytes.len())))?;
    Ok((i64_from_key(*at), utf8(table, key)?))
}

/// The scope key with its `u16` length before it, and room for `tail` more bytes. Fails when
/// the scope key is longer than 65535 bytes.
fn prefixed(what: &str, key: &str, tail: usize) -> Result<Vec<u8>, StoreError> {
    let len = u16::try_from(key.len()).map_err(|_| {
        StoreError::Backend(format!(
            "scope key of {} bytes is too long for a {what} key (max 65535)",
            key.len()
        ))
    })?;
    let mut out = Vec::with_capacity(2 + key.len() + tail);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    Ok(out)
}

/// Inverse of [`prefixed`]: the scope key and the `N` bytes after it, which must end `bytes`.
fn split_prefixed<const N: usize>(
    table: &'static str,
    what: &str,
    bytes: &[u8],
) -> Result<(String, [u8; N]), StoreError> {
    let bad = || corrupt(table, format!("{what} key of {} bytes", bytes.len()));
    let (len, rest) = bytes.split_first_chunk::<2>().ok_or_else(bad)?;
    let len = usize::from(u16::from_be_bytes(*len));
    if rest.len() != len + N {
        return Err(bad());
    }
    let (key, tail) = rest.split_at(len);
    let tail: [u8; N] = tail.try_into().map_err(|_| bad())?;
    Ok((utf8(table, key)?, tail))
}

/// Key of the payload of the event `tie` of scope key `key`. Fails when the scope key is longer
/// than 65535 bytes (the length prefix is a `u16`).
pub(crate) fn payload_key(key: &str, tie: u64) -> Result<Vec<u8>, StoreError> {
    let mut out = prefixed("payload", key, 8)?;
    out.extend_from_slice(&tie.to_be_bytes());
    Ok(out)
}

/// Key of chunk `index` of the open events of session `num` of scope key `key` (see
/// [`super::chunks`]). Fails when the scope key is longer than 65535 bytes.
pub(crate) fn chunk_key(key: &str, num: u64, index: u32) -> Result<Vec<u8>, StoreError> {
    let mut out = prefixed("chunk", key, 12)?;
    out.extend_from_slice(&num.to_be_bytes());
    out.extend_from_slice(&index.to_be_bytes());
    Ok(out)
}

/// Inverse of [`chunk_key`]: `(key, num, index)`.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn decode_chunk_key(
    table: &'static str,
    bytes: &[u8],
) -> Result<(String, u64, u32), StoreError> {
    let (key, tail) = split_prefixed::<12>(table, "chunk", bytes)?;
    let (mut num, mut index) = ([0u8; 8], [0u8; 4]);
    num.copy_from_slice(&tail[..8]);
    index.copy_from_slice(&tail[8..]);
    Ok((key, u64::from_be_bytes(num), u32::from_be_bytes(index)))
}

/// Inverse of [`payload_key`].
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn decode_payload_key(
    table: &'static str,
    bytes: &[u8],
) -> Result<(String, u64), StoreError> {
    let (key, tie) = split_prefixed::<8>(table, "payload", bytes)?;
    Ok((key, u64::from_be_bytes(tie)))
}

/// Key of the committed offset of `topic`/`partition`.
pub(crate) fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(topic.len() + 5);
    out.extend_from_slice(topic.as_bytes());
    out.push(0);
    out.extend_from_slice(&((partition as u32) ^ I32_SIGN).to_be_bytes());
    out
}

/// Inverse of [`offset_key`]: `(topic, partition)`. The topic is everything before the last
/// five bytes, so a topic containing `0x00` still decodes.
pub(crate) fn decode_offset_key(
    table: &'static str,
    bytes: &[u8],
) -> Result<(String, i32), StoreError> {
    let bad = || corrupt(table, format!("offset key of {} bytes", bytes.len()));
    let (head, part) = bytes.split_last_chunk::<4>().ok_or_else(bad)?;
    let (&sep, topic) = head.split_last().ok_or_else(bad)?;
    if sep != 0 {
        return Err(bad());
    }
    let partition = (u32::from_be_bytes(*part) ^ I32_SIGN) as i32;
    Ok((utf8(table, topic)?, partition))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{KeyState, PartitionMeta};
    use proptest::prelude::*;

    fn key_strategy() -> impl Strategy<Value = String> {
        // Short keys over a small alphabet (incl. NUL and multi-byte chars) so prefixes and
        // equal keys actually occur.
        proptest::collection::vec(
            prop_oneof![Just('\0'), Just('a'), Just('b'), Just('é')],
            0..4,
        )
        .prop_map(|v| v.into_iter().collect())
    }

    fn at_strategy() -> impl Strategy<Value = i64> {
        prop_oneof![any::<i64>(), -3i64..3, Just(i64::MIN), Just(i64::MAX)]
    }

    proptest! {
        #[test]
        fn timer_key_order_is_tuple_order(
            a in (at_strategy(), key_strategy()),
            b in (at_strategy(), key_strategy()),
        ) {
            let ka = timer_key(a.0, &a.1);
            let kb = timer_key(b.0, &b.1);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(decode_timer_key("t", &ka)?, a);
        }

        #[test]
        fn payload_key_round_trip(key in key_strategy(), tie in any::<u64>()) {
            let k = payload_key(&key, tie)?;
            prop_assert_eq!(decode_payload_key("p", &k)?, (key, tie));
        }

        #[test]
        fn chunk_key_round_trip_and_order(
            key in key_strategy(),
            a in (any::<u64>(), any::<u32>()),
            b in (any::<u64>(), any::<u32>()),
        ) {
            let ka = chunk_key(&key, a.0, a.1)?;
            prop_assert_eq!(decode_chunk_key("c", &ka)?, (key.clone(), a.0, a.1));
            // Within one scope key, byte order is (session, index) order.
            let kb = chunk_key(&key, b.0, b.1)?;
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
        }

        #[test]
        fn offset_key_round_trip_and_order(
            a in (key_strategy(), any::<i32>()),
            b in (key_strategy(), any::<i32>()),
        ) {
            let ka = offset_key(&a.0, a.1);
            prop_assert_eq!(decode_offset_key("m", &ka)?, a.clone());
            // Within one topic, byte order is partition order.
            let kb = offset_key(&a.0, b.1);
            prop_assert_eq!(ka.cmp(&kb), a.1.cmp(&b.1));
        }
    }

    #[test]
    fn values_round_trip() -> Result<(), StoreError> {
        let ks = KeyState {
            user: "u1".into(),
            created: 3,
            arrivals: 7,
            deadline_timer: Some(-5),
            ..KeyState::default()
        };
        let bytes = encode_value("keys", &ks)?;
        assert_eq!(decode_value::<KeyState>("keys", &bytes)?, ks);
        let meta = PartitionMeta {
            open_sessions: 9,
            ..PartitionMeta::default()
        };
        let bytes = encode_value("meta", &meta)?;
        assert_eq!(decode_value::<PartitionMeta>("meta", &bytes)?, meta);
        Ok(())
    }

    #[test]
    fn bad_bytes_are_corrupt_errors() {
        let err = decode_value::<KeyState>("keys", &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(
            matches!(err, StoreError::Corrupt { table: "keys", .. }),
            "{err}"
        );
        assert!(decode_timer_key("t", &[1, 2, 3]).is_err());
        assert!(decode_timer_key("t", &[0, 0, 0, 0, 0, 0, 0, 0, 0xff]).is_err());
        assert!(decode_payload_key("p", &[0, 5, b'a']).is_err());
        assert!(decode_offset_key("m", &[1, 0, 0, 0, 0]).is_err());
        assert!(decode_offset_key("m", &[0, 0, 0]).is_err());
        assert!(payload_key(&"x".repeat(70_000), 1).is_err());
        assert!(chunk_key(&"x".repeat(70_000), 1, 0).is_err());
        assert!(decode_chunk_key("c", &[0, 1, b'a', 0, 0]).is_err());
    }
}
