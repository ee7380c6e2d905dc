//! Codec: bytes <-> events and output records. [`decode`] reads input records; [`records`]
//! writes annotated events and the JSON of sessions, merges, splits and user stats.

pub mod decode;
pub mod records;

pub use decode::{DecodeError, Decoded, Decoder};
