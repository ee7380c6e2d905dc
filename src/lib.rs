//! Sessionizer: event-time sessionization of app/web events.
//!
//! `engine` is the pure sessionization core; `store` keeps its state (in memory or RocksDB);
//! `config` turns raw settings into a validated form; `codec` maps bytes to events and records;
//! `offline` runs the engine over JSON lines; `cli` is the command line; `metrics` names every
//! Prometheus metric and `http` serves them with the health endpoints; `generate` makes
//! synthetic events; `kafka` (clients, outputs) and `pipeline` are the streaming mode.

pub mod cli;
pub mod codec;
pub mod config;
pub mod engine;
pub mod generate;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod offline;
pub mod pipeline;
pub mod store;
