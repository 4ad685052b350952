//! `deployhook serve`: wires config, store, queue and HTTP together and runs the daemon's life:
//! start-up in a safe order, SIGHUP reloads, and a shutdown with deadlines.
//!
//! Start-up order matters: signal handlers come first (a SIGHUP or SIGTERM during start-up is
//! handled once the daemon runs, never fatal), then the config is validated (nothing is
//! touched for a bad config), then the state dir is locked (a second daemon stops here, at
//! once), then the admin token, then the listener is bound (a taken port stops the
//! start before any build is resumed), then the queue recovers and resumes builds, and only
//! then does the server accept — so no request is answered before the daemon can honour it,
//! and no signal arrives before its handler.
//!
//! Under systemd, the service manager hears of each step (see [`crate::notify`]): `READY=1`
//! once the server accepts, `RELOADING=1`/`READY=1` around each SIGHUP reload, `STOPPING=1`
//! when shutdown begins.

use std::io::IsTerminal as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::RwLock;

use crate::access::ApiTokens;
use crate::blocking;
use crate::config::{Config, ConfigError, SharedConfig};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::model::Timestamp;
use crate::notify::Notifier;
use crate::queue::Queue;
use crate::runner::RunSettings;
use crate::shutdown::{self, Phase, SignalEvent, Signals};
use crate::store::{Store, StoreError};
use crate::token::TokenError;
use crate::tunables::Tunables;

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The config is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The state dir is unusable or in use.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The admin token file is unusable.
    #[error("{0}")]
    Token(#[from] TokenError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source} (is another process using the port?)")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The database failed while running; systemd should restart the daemon.
    #[error("stopping after a database failure: {0}")]
    Fatal(String),
}

/// `serve --log-format`: how log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Text; colours only on a terminal, no timestamps under journald (it adds its own).
    #[default]
    Auto,
    /// Text with timestamps and without colours, wherever stderr goes.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The shape of text log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TextStyle {
    ansi: bool,
    timestamps: bool,
    /// A `<N>` syslog priority before each line, which journald reads from a service's
    /// stderr (and strips): without it every line is "info", and `journalctl -p err` never
    /// shows a rejected reload.
    priority: bool,
}

/// The text style for `format` (`None`: JSON), given where stderr goes.
fn text_style(format: LogFormat, terminal: bool, journald: bool) -> Option<TextStyle> {
    match format {
        LogFormat::Json => None,
        LogFormat::Text => Some(TextStyle {
            ansi: false,
            timestamps: true,
            priority: journald,
        }),
        LogFormat::Auto => Some(TextStyle {
            ansi: terminal && !journald,
            timestamps: !journald,
            priority: journald,
        }),
    }
}

/// The syslog priority journald files a line of `level` under (`sd-daemon(3)`'s `SD_ERR`…).
fn syslog_priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        tracing::Level::DEBUG | tracing::Level::TRACE => 7,
    }
}

/// An event formatter that puts the event's syslog priority (`<3>`) before what `inner`
/// writes.
struct WithPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for WithPriority<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", syslog_priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Whether stderr is connected to the journal: systemd sets `$JOURNAL_STREAM` to the
/// `device:inode` of the stream it hands the service, and a match with stderr proves the
/// stream was not redirected since (a child of a service inherits the variable).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd as _;
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr().as_fd()) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}

/// Logs go to stderr at `RUST_LOG`'s level, else `[server] log_level`.
fn init_tracing(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let style = text_style(format, std::io::stderr().is_terminal(), stderr_is_journal());
    let _ = tracing::subscriber::set_global_default(subscriber(filter, style, std::io::stderr));
}

/// The subscriber writing lines of `style` (`None`: JSON) to `writer`.
fn subscriber<W>(
    filter: tracing_subscriber::EnvFilter,
    style: Option<TextStyle>,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    let Some(style) = style else {
        return Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .finish(),
        );
    };
    let text = tracing_subscriber::fmt::format().with_target(false);
    let builder = builder.with_ansi(style.ansi);
    match (style.timestamps, style.priority) {
        (true, false) => Box::new(builder.event_format(text).finish()),
        (false, false) => Box::new(builder.event_format(text.without_time()).finish()),
        (true, true) => Box::new(builder.event_format(WithPriority(text)).finish()),
        (false, true) => Box::new(
            builder
                .event_format(WithPriority(text.without_time()))
                .finish(),
        ),
    }
}

/// Raises the open-file limit to its hard maximum (each connection and each build's pipes
/// take descriptors; the default soft limit of 1024 is easy to exhaust). Returns the limit.
fn raise_nofile_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// How long notifications and statuses in flight get when the daemon stops; the rest go out
/// after the next start.
const OUTBOX_STOP_GRACE: Duration = Duration::from_secs(2);

/// Slack, past the drain, the outbox's grace and the connections' close deadline, that a stop
/// after a database failure gets before the process exits without finishing it.
const FAILED_STOP_SLACK: Duration = Duration::from_secs(20);

/// After a database error the daemon stops so that the service manager restarts it. sled's
/// calls are synchronous, and one that hangs after an I/O error can hold the runtime's threads
/// and the queue's mutex, which the stop needs: with a full disk, a transaction queued in sled
/// behind a flush that never returned (see `store`'s `# Hangs`, which keeps that one from
/// happening). Against any other such hang a plain thread watches for the failure and, if the
/// process still runs `shutdown_timeout` + 27 s later, exits with status 1 itself. Nothing is
/// lost by it: every acknowledged trigger was flushed before its answer, and builds die with
/// the daemon.
fn exit_if_a_failed_store_stalls_the_stop(store: &Store, drain: Duration) {
    let failed = store.failure_watch();
    let deadline = drain + OUTBOX_STOP_GRACE + crate::http::CLOSE_DEADLINE + FAILED_STOP_SLACK;
    let watch = move || {
        while !*failed.borrow() {
            std::thread::sleep(Duration::from_millis(500));
        }
        std::thread::sleep(deadline);
        tracing::error!(
            "the database failed and the daemon did not stop within {}s; exiting now",
            deadline.as_secs()
        );
        std::process::exit(1);
    };
    if let Err(e) = crate::blocking::spawn("watching the stop after a database failure", watch) {
        tracing::warn!("{e}");
    }
}

/// Runs the daemon until SIGTERM/SIGINT (or a fatal database error). `tunables` are the
/// production defaults except in tests (see [`crate::tunables`]).
pub async fn run(
    config_path: &Path,
    log_format: LogFormat,
    tunables: Tunables,
) -> Result<(), DaemonError> {
    // First of all, so that a SIGHUP or SIGTERM during start-up is handled, not fatal.
    let mut signals = Signals::install().map_err(DaemonError::Signals)?;
    let config = Config::load(config_path)?;
    init_tracing(&config.server.log_level, log_format);
    if tunables != Tunables::default() {
        // Only tests set them; a production daemon running with them would drop clients.
        tracing::warn!(
            "{} is set: internal timeouts differ from the production ones: {tunables:?}",
            crate::tunables::ENV_VAR
        );
    }
    let notifier = Arc::new(Notifier::from_env());
    let nofile = raise_nofile_limit();

    let store = Store::open(&config.server.state_dir)?;
    exit_if_a_failed_store_stalls_the_stop(&store, config.server.shutdown_timeout);
    let (tokens, created) = ApiTokens::load(&config, true)?;
    for path in created {
        tracing::info!(
            "generated an API token into {} (mode 0600); client commands read the [api] one from there",
            path.display()
        );
    }
    let settings = RunSettings::from_env(&config.server.state_dir);
    // Bound before the queue recovers and starts builds: if the port is taken, nothing has
    // been started that the failed start would then leave half-done. (Connections wait in the
    // backlog until the server accepts.)
    let listen = config.server.listen;
    let listener = http::bind(listen).map_err(|source| DaemonError::Listen {
        addr: listen,
        source,
    })?;
    let body_budget = AppState::body_budget(config.server.max_git_body_bytes);
    let shared = Arc::new(SharedConfig::new(config));
    let metrics = Arc::new(Metrics::new());
    let queue = Queue::start(store.clone(), shared.clone(), settings, metrics.clone())?;
    let local = listener.local_addr().unwrap_or(listen);
    // Counted now that the database, the listener and recovery have their descriptors.
    let max_connections = http::connection_cap(
        nofile,
        crate::descriptors::open().unwrap_or(64),
        shared.get().server.max_concurrent_builds,
    );
    tracing::debug!("at most {max_connections} connections (open-file limit {nofile})");
    let client = crate::outbound::Outbound::new().map_err(|e| DaemonError::Fatal(e.to_string()))?;
    let public_url = if shared.get().server.public_url_is_default {
        let mut a = local;
        if a.ip().is_unspecified() {
            a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{a}")
    } else {
        shared.get().server.public_url.clone()
    };
    let outbox = crate::outbox::Outbox::start(crate::outbox::Parts {
        store: store.clone(),
        config: shared.clone(),
        metrics: metrics.clone(),
        client,
        wake: queue.outbox_wake(),
        public_url,
    });
    let state = Arc::new(AppState {
        config: shared.clone(),
        store: store.clone(),
        queue: queue.clone(),
        tokens: RwLock::new(tokens),
        shutting_down: AtomicBool::new(false),
        max_connections,
        local_addr: local,
        unauthenticated_body_budget: body_budget,
        metrics,
        tunables,
        quiet_log: Default::default(),
        outbox: Some(outbox.clone()),
        ui: Default::default(),
        join_answers: Default::default(),
    });
    tracing::info!("listening on {local}");

    let (trigger, watch) = shutdown::channel();
    let server = tokio::spawn(http::serve(listener, state.clone(), watch));
    notifier.ready(&format!("listening on {local}"));
    let pruner = tokio::spawn(prune_deliveries(store.clone()));
    let schedules_changed = Arc::new(tokio::sync::Notify::new());
    let scheduler = tokio::spawn(crate::schedule::run(
        queue.clone(),
        store.clone(),
        shared.clone(),
        state.metrics.clone(),
        crate::schedule::Clock::from_env(),
        schedules_changed.clone(),
    ));

    let reloading = Arc::new(tokio::sync::Mutex::new(()));
    // Heard at once, and without the runtime's threads or timers: this future runs on the
    // thread that called `block_on`, and the store's failure wakes it directly (see
    // `exit_if_a_failed_store_stalls_the_stop`).
    let mut failed = store.failure_watch();
    let mut fatal = None;
    loop {
        tokio::select! {
            ev = signals.next() => match ev {
                // In its own task: reading the config may block (a FIFO, a hung NFS mount),
                // and SIGTERM must still be heard meanwhile.
                SignalEvent::Reload => {
                    tokio::spawn(reload(config_path.to_path_buf(), shared.clone(), state.clone(), reloading.clone(), notifier.clone(), schedules_changed.clone()));
                }
                SignalEvent::Stop(name) => {
                    tracing::info!("{name} received: shutting down");
                    break;
                }
            },
            Ok(_) = failed.wait_for(|f| *f) => {
                tracing::error!("the database failed; stopping so that the service manager can restart deployhook");
                fatal = Some("the database reported an error".to_owned());
                break;
            }
        }
    }

    notifier.stopping();
    state.shutting_down.store(true, Ordering::SeqCst);
    trigger.set(Phase::Draining);
    let grace = shared.get().server.shutdown_timeout;
    let drain = queue.shutdown(grace);
    tokio::pin!(drain);
    loop {
        tokio::select! {
            _ = &mut drain => break,
            ev = signals.next() => match ev {
                // A reload (logrotate, `systemctl reload`) must not cut the drain short.
                SignalEvent::Reload => tracing::info!("SIGHUP ignored: shutting down"),
                SignalEvent::Stop(name) => {
                    tracing::warn!("{name} received again: interrupting builds now");
                    queue.shutdown(Duration::ZERO).await;
                    break;
                }
            },
        }
    }
    // Deliveries in flight get a moment; whatever is still pending goes out after the next
    // start (the outbox is durable), so shutdown is never held up by a slow receiver.
    outbox.shutdown(OUTBOX_STOP_GRACE).await;
    trigger.set(Phase::Closing);
    let _ = tokio::time::timeout(tunables.close_deadline + Duration::from_secs(1), server).await;
    pruner.abort();
    scheduler.abort();
    store.flush_blocking()?;
    store.close();
    tracing::info!("stopped");
    match fatal {
        Some(f) => Err(DaemonError::Fatal(f)),
        None => Ok(()),
    }
}

/// SIGHUP: re-read the config; keep the old one if the new one is invalid. Builds in flight
/// keep the settings they started with. The service manager hears `RELOADING=1` before and
/// `READY=1` after, whether the new config was taken or rejected.
async fn reload(
    path: std::path::PathBuf,
    shared: Arc<SharedConfig>,
    state: Arc<AppState>,
    reloading: Arc<tokio::sync::Mutex<()>>,
    notifier: Arc<Notifier>,
    schedules_changed: Arc<tokio::sync::Notify>,
) {
    // One reload at a time, in signal order.
    let _one = reloading.lock().await;
    if state.is_shutting_down() {
        // STOPPING=1 has been sent; a late READY=1 would contradict it.
        return;
    }
    notifier.reloading();
    let status = apply_reload(path, shared, &state).await;
    schedules_changed.notify_one();
    let local = state.local_addr;
    notifier.ready(&format!("listening on {local}; {status}"));
}

/// Loads and applies a new config; returns a status line for the service manager.
async fn apply_reload(
    path: std::path::PathBuf,
    shared: Arc<SharedConfig>,
    state: &AppState,
) -> &'static str {
    let loaded = blocking::run("reading the config", move || {
        Config::load(&path).map(|c| {
            let tokens = ApiTokens::load(&c, false);
            (c, tokens)
        })
    })
    .await;
    let (new, token) = match loaded {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::error!("config reload rejected, the old config stays in force: {e}");
            return "the last reload was rejected (see the log)";
        }
        // At the service's task limit: nothing was read, so nothing changes.
        Err(e) => {
            tracing::error!("config reload rejected, the old config stays in force: {e}");
            return "the last reload failed (see the log)";
        }
    };
    let old = shared.get();
    if new.server.listen != old.server.listen {
        tracing::warn!(
            "server.listen changed to {}; it takes effect at the next restart",
            new.server.listen
        );
    }
    if new.server.state_dir != old.server.state_dir {
        tracing::warn!("server.state_dir changed; it takes effect at the next restart");
    }
    match token {
        Ok((t, created)) => {
            for path in created {
                tracing::info!("generated an API token into {} (mode 0600)", path.display());
            }
            *state.tokens.write().await = t;
        }
        Err(e) => tracing::warn!("API tokens not reloaded, the old ones stay in force: {e}"),
    }
    let projects = new.projects.len();
    shared.replace(new);
    tracing::info!(projects, "config reloaded");
    state.queue.schedule();
    "config reloaded"
}

/// Forgets Git delivery ids older than the replay window, hourly.
async fn prune_deliveries(store: Store) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let before = Timestamp::now().before(http::public::DELIVERY_WINDOW);
        let s = store.clone();
        match blocking::run("pruning Git deliveries", move || s.prune_deliveries(before)).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!("forgot {n} old Git deliveries"),
            Ok(Err(e)) => tracing::error!("cannot prune Git deliveries: {e}"),
            Err(e) => tracing::warn!("Git deliveries not pruned this hour: {e}"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_style_follows_the_format_and_where_stderr_goes() {
        use LogFormat::{Auto, Json, Text};
        let style = |ansi, timestamps, priority| {
            Some(TextStyle {
                ansi,
                timestamps,
                priority,
            })
        };
        // (format, stderr a terminal, stderr journald, the style wanted).
        // auto: colours on a terminal only; journald adds its own timestamps and reads
        // each line's priority from a `<N>` prefix.
        for (format, terminal, journald, want) in [
            (Auto, true, false, style(true, true, false)),
            (Auto, false, false, style(false, true, false)),
            (Auto, false, true, style(false, false, true)),
            (Auto, true, true, style(false, false, true)),
            (Text, true, true, style(false, true, true)),
            (Text, false, false, style(false, true, false)),
            (Json, true, false, None),
        ] {
            assert_eq!(
                text_style(format, terminal, journald),
                want,
                "{format:?}, terminal {terminal}, journald {journald}"
            );
        }
    }

    /// A writer into a shared buffer, for reading back what a subscriber wrote.
    #[derive(Clone, Default)]
    struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What one error, warning, info, debug and trace line look like in `style`.
    fn lines_in(style: Option<TextStyle>) -> Vec<String> {
        let buf = Buffer::default();
        let out = buf.clone();
        let filter = tracing_subscriber::EnvFilter::new("trace");
        let sub = subscriber(filter, style, move || out.clone());
        tracing::subscriber::with_default(sub, || {
            tracing::error!("config reload rejected, the old config stays in force");
            tracing::warn!("a warning");
            tracing::info!(projects = 2, "config reloaded");
            tracing::debug!("a detail");
            tracing::trace!("a finer detail");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn under_journald_each_line_starts_with_its_syslog_priority() {
        let journald = text_style(LogFormat::Auto, false, true);
        let lines = lines_in(journald);
        assert_eq!(lines.len(), 5, "{lines:?}");
        let prefixes: Vec<&str> = lines.iter().map(|l| &l[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>", "<7>"]);
        // The prefix is all journald needs: no timestamp (it adds its own), no colours.
        assert_eq!(
            lines[0],
            "<3>ERROR config reload rejected, the old config stays in force"
        );
        assert_eq!(lines[2], "<6> INFO config reloaded projects=2");
    }

    #[test]
    fn elsewhere_lines_carry_no_priority_prefix() {
        for style in [
            text_style(LogFormat::Auto, false, false),
            text_style(LogFormat::Text, false, false),
            None,
        ] {
            let lines = lines_in(style);
            assert_eq!(lines.len(), 5, "{lines:?}");
            assert!(lines.iter().all(|l| !l.starts_with('<')), "{lines:?}");
        }
    }
}
