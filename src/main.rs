//! The `sessionizer` binary: everything is in the library; see `sessionizer::cli`.

/// jemalloc serves every allocation of the process, librdkafka's and RocksDB's too (the
/// `unprefixed_malloc_on_supported_platforms` feature): its thread caches take frees of memory
/// another thread allocated (every consumed message) without the arena lock glibc's malloc
/// makes the consumer thread wait for.
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    sessionizer::cli::main()
}
