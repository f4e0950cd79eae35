//! The `fairgate` binary; see [`fairgate_gateway::cli`].

fn main() -> std::process::ExitCode {
    fairgate_gateway::cli::main()
}
