//! The `fairgate` binary; see [`fairgate_gateway::cli`].

/// mimalloc instead of glibc's malloc: per-thread free lists without arena locks or
/// consolidation passes. Under the load harness the allocator was 11.9 % of the gateway's CPU
/// samples with glibc and 3.3 % with mimalloc (BENCHMARKS.md, "Fourth session"). The binary
/// only: the library crates leave the choice to the application that embeds them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    fairgate_gateway::cli::main()
}
