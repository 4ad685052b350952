//! Integration tests: the real `deployhook` binary on a temp dir and port 0, driven over HTTP
//! and through its CLI. One test crate (faster to build and link than one per file).

mod access;
mod browser;
mod builds;
mod client;
mod examples;
mod foundation;
mod git;
mod git_hosts;
mod hostile;
mod hostile2;
mod hostile3;
mod machine;
mod ops;
mod outbox;
mod reliability;
mod supervisor;
mod ui;
mod util;
mod wait;
