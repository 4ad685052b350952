//! The `deployhook` binary: everything lives in the library; this only picks the mode.

use std::process::ExitCode;

/// jemalloc with background threads purging freed pages: after a burst (thousands of new
/// builds, connections or hooks) the daemon's RSS comes back down within seconds of idling,
/// where glibc malloc kept it (see README "Performance" for the measurements).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// mimalloc, when built with `--no-default-features --features mimalloc` (for comparison).
#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The per-build supervisor (see `deployhook::supervisor`) re-executes this binary; it
    // must not pay for clap or a runtime.
    if args
        .get(1)
        .is_some_and(|a| a == deployhook::supervisor::MODE_ARG)
    {
        return ExitCode::from(deployhook::supervisor::main(&args[2..]).clamp(0, 255) as u8);
    }
    deployhook::cli::main(args)
}
