//! The `sessionizer` binary: everything is in the library; see `sessionizer::cli`.

fn main() -> std::process::ExitCode {
    sessionizer::cli::main()
}
