//! The `fairgate` binary; see [`fairgate_gateway::cli`].

/// mimalloc instead of glibc's malloc: per-thread free lists without arena locks or
/// consolidation passes. Under the load harness the allocator was 11.9 % of the gateway's CPU
/// samples with glibc and 3.3 % with mimalloc (BENCHMARKS.md, "Fourth session"). The binary
/// only: the library crates leave the choice to the application that embeds them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    disable_transparent_huge_pages();
    fairgate_gateway::cli::main()
}

/// Opts the process out of transparent huge pages. mimalloc marks its memory
/// `MADV_HUGEPAGE`, which makes it eligible under Debian's default THP mode (`madvise`);
/// the kernel's `khugepaged` then wakes every 10 s and, while it collapses the process's pages
/// into huge ones, holds its memory map lock: every thread that faults a page in waits. Seen
/// under `perf` as 100–230 ms pauses of the whole gateway (the overload scenarios' S3 and L2
/// failures; BENCHMARKS.md, "Eleventh session"). The gateway's heap is tens of MiB: huge
/// pages buy it nothing measurable.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!(
            "fairgate: could not opt out of transparent huge pages ({e}); latency may show pauses while the kernel collapses pages"
        );
    }
}
