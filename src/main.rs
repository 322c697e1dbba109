#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    braid::cli::main()
}
