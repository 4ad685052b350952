//! deployhook: a single-binary, self-hosted deploy-hook daemon.
//!
//! It gives each project unguessable trigger URLs, accepts signed push webhooks from Git hosts,
//! and runs the project's build command as a supervised child process: queued, deduplicated,
//! cancellable, logged, and remembered across restarts in an embedded sled database. The
//! external contract (CLI, config, HTTP, JSON) is `SPEC.md`; the README explains it for users.
//!
//! # Layout
//! - [`cli`]: clap definitions, exit codes, and the HTTP client behind the client commands.
//! - [`descriptors`]: file descriptors shared by connections and builds: the floor builds
//!   leave to HTTP.
//! - [`daemon`]: `deployhook serve`: start-up order, SIGHUP reload, shutdown with deadlines.
//! - [`config`]: raw TOML mirror → validated [`config::Config`]; the shared, reloadable handle;
//!   `config::sinks` holds the (v2) `[notify.*]` and `[projects.*.status]` keys.
//!   `config/access.rs` the keys of quiet periods, params, allowlists, schedules and API tokens.
//! - [`model`]: builds, hooks, phases, outcomes, trigger sources, and their JSON shapes.
//! - [`token`]: hook tokens, API token files, Git secrets: generation, hashing, constant-time checks.
//! - [`access`]: API token scopes and project lists ([`access::ApiTokens::authenticate`]), and
//!   the client address `allow_from` judges (`trusted_proxies`, `X-Forwarded-For`).
//! - [`params`]: trigger parameters from query strings and bodies, with their limits (pure).
//! - [`schedule`]: `[[projects.P.schedule]]`: cron in time zones, missed runs, the scheduler task.
//! - [`store`]: the only module that touches sled: trees, bincode records, batched durability,
//!   and the in-memory map of hooks by token hash that the hot path reads.
//! - [`ratelimit`]: rolling 60 s windows of new builds per project and per daemon (pure).
//! - [`machine`]: the build state machine (pure): every transition as an event in, effects out.
//! - [`queue`]: the shell around the machine: applies its effects (store, runners, waiters, logs).
//! - [`quietlog`]: aggregation of log lines a client can cause at request rate.
//! - [`runner`]: one build: checkout, spawn under a supervisor, logs, timeout, stop, outcome.
//! - [`supervisor`]: the hidden per-process supervisor mode that makes builds die with the daemon,
//!   and the daemon's handle on it (protocol, escalation, reaping) with its warm pool.
//! - [`blocking`]: blocking work on threads of its own, an error (not a panic) when none can start.
//! - [`buildlog`]: capped append-only NDJSON log files, line splitting, paging.
//! - [`git`]: Git-host webhooks (pure): host detection, signatures, every host's push shapes
//!   (multi-ref, tags, System Hooks), skip markers and `paths`, delivery ids.
//! - [`http`]: accept loop and hardening; `api` (admin), `public` (hooks, Git, health, metrics),
//!   `envelope` (the typed envelope, responses and error codes), `error` (domain errors →
//!   HTTP errors), `conn` (per-connection framing checks, the first head, eviction), `follow`
//!   (what the NDJSON and SSE log followers share: the wait for more lines).
//! - [`ui`]: the status pages and badge: routes, sessions, maud templates, live log (SSE).
//! - [`shutdown`]: signals and the shutdown phases.
//! - [`metrics`]: the Prometheus registry (counters, histogram) and its text exposition.
//! - [`notify`]: systemd's readiness protocol (`READY=1`, `RELOADING=1`, `STOPPING=1`).
//! - [`outbox`]: what leaves the daemon (SPEC §5): entries planned from the machine's tells,
//!   stored with the build change, and the one worker that delivers and retries them.
//! - [`notifications`]: notification bodies (`json` signed per Standard Webhooks, Slack, Discord).
//! - [`statuses`]: commit-status requests and state words of the six Git-host providers.
//! - [`outbound`]: the HTTP client for both: rustls, timeouts, no redirects, bounded answers.
//! - [`tunables`]: internal timeouts and intervals (production defaults; tests shorten them).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod blocking;
pub mod buildlog;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod descriptors;
pub mod git;
pub mod http;
pub mod machine;
pub mod metrics;
pub mod model;
pub mod notifications;
pub mod notify;
pub mod outbound;
pub mod outbox;
pub mod params;
pub mod queue;
pub mod quietlog;
pub mod ratelimit;
pub mod runner;
pub mod schedule;
pub mod shutdown;
pub mod statuses;
pub mod store;
pub mod supervisor;
pub mod token;
pub mod tunables;
pub mod ui;
