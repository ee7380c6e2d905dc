//! State store implementations of [`crate::engine::StateStore`].
