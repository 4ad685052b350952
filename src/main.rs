//! The `deployhook` binary: everything lives in the library; this only picks the mode.

use std::process::ExitCode;

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
