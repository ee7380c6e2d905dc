//! The sessionization core. Pure and deterministic: no I/O, no async, no clock, no randomness.
//! Time enters only as values (event times, the watermark, a "now" passed in by the caller).
//!
//! - [`types`]: events keys, reasons, ids, output records;
//! - [`rules`]: validated parameters and the boundary rule between consecutive events;
//! - [`watermark`]: the per-task event-time watermark;
//! - `key`: sessionization of one scope key (insert, merge, split, expire);
//! - [`state`]: the state interface ([`StateStore`]) and what is kept in it;
//! - [`processor`]: [`Engine`], one task's sessionizer.

pub(crate) mod key;
pub mod processor;
pub mod rules;
pub mod state;
pub mod types;
pub mod watermark;

pub use processor::{key_hash, Counters, Engine, InputEvent};
pub use rules::{AnnotateMode, EngineConfig, FuturePolicy};
pub use state::*;
pub use types::*;
pub use watermark::{Watermark, WatermarkParams};
