//! The configuration file (`deploy.toml`, SPEC §3), loaded in two phases.
//!
//! Phase one deserializes a *raw mirror* of the TOML with `deny_unknown_fields`, keeping the
//! byte span of every value that phase two may reject. Phase two turns it into a validated
//! [`Config`] whose types rule out bad states: durations are [`Duration`]s, project names and
//! branches are checked newtypes, paths are absolute, and a project either has a `repo` or an
//! existing `workdir`. Every error renders as one line, `FILE:LINE:COL: KEY: what is wrong`, so
//! an operator can jump straight to the mistake.
//!
//! Secrets (the Git webhook secrets of `git_secret_file`) are read here, at load time, so a
//! reload that cannot read them is rejected as a whole instead of half-applied.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::token::GitSecret;

pub mod sinks;

pub use sinks::{Event, Provider, SinkConfig, SinkFormat, StatusConfig};
mod access;
pub use access::{ApiTokenConfig, ProjectAccess, valid_param_name};

/// Largest `max_body_bytes` (and `max_git_body_bytes`) accepted: request bodies are held in
/// memory while they are stored.
pub const MAX_BODY_LIMIT: u64 = 64 * 1024 * 1024;

/// Default `max_git_body_bytes`: GitHub sends push payloads of up to 25 MB.
pub const DEFAULT_MAX_GIT_BODY_BYTES: u64 = 25 * 1024 * 1024;

/// A configuration error, rendered as `FILE:LINE:COL: KEY: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The config file the error is about.
    pub file: PathBuf,
    /// 1-based line and column, when the parser knows where the problem is.
    pub position: Option<(usize, usize)>,
    /// Dotted key path, e.g. `projects.site.branches`.
    pub key: String,
    /// What is wrong, in words an operator can act on.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file.display())?;
        if let Some((line, col)) = self.position {
            write!(f, "{line}:{col}:")?;
        }
        if self.key.is_empty() {
            write!(f, " {}", self.message)
        } else {
            write!(f, " {}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A project name: `^[a-z0-9][a-z0-9_-]{0,62}$` (SPEC §1).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProjectName(String);

impl ProjectName {
    /// Validates a project name.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bytes = s.as_bytes();
        let ok_first = bytes
            .first()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let ok_rest = bytes[1.min(bytes.len())..]
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-');
        if ok_first && ok_rest && bytes.len() <= 63 {
            Ok(Self(s.to_owned()))
        } else {
            Err(format!(
                "invalid project name {s:?}: use 1 to 63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit"
            ))
        }
    }

    /// The name as written in the config.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// ---------------------------------------------------------------------------------------------
// Branch and tag names, their globs, and path filters (SPEC §3, v2).

/// Why `s` is not a name `git check-ref-format --branch` accepts, or `None` when it is one.
///
/// The rules are git's own (`git help check-ref-format`), applied to the name as the last part
/// of `refs/heads/NAME` or `refs/tags/NAME`: no component may start with `.` or end with
/// `.lock`; no `..`; no ASCII control character, DEL, space, `~`, `^`, `:`, `?`, `*`, `[` or
/// `\`; no leading, trailing or doubled `/`; no trailing `.`; no `@{`. `--branch` adds: no
/// leading `-`, and not `HEAD`. Anything else is allowed, Unicode included, which is safe
/// because a name only ever reaches git as one argv element after `--`, never through a
/// shell and never as a path component. On top of git, names are capped at
/// [`BranchName::MAX_LEN`] bytes so that a hostile payload cannot make us hold or log a
/// megabyte-long "branch".
pub fn ref_name_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        return Some("is empty");
    }
    if s.len() > BranchName::MAX_LEN {
        return Some("is longer than 255 bytes");
    }
    if let Some(c) = s.chars().find(|c| {
        c.is_ascii_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\')
    }) {
        return Some(match c {
            ' ' => "must not contain a space",
            '~' | '^' | ':' => "must not contain '~', '^' or ':'",
            '?' | '*' | '[' => "must not contain '?', '*' or '['",
            '\\' => "must not contain '\\'",
            _ => "must not contain control characters",
        });
    }
    if s.starts_with('-') {
        return Some("must not start with '-'");
    }
    if s == "HEAD" {
        return Some("must not be HEAD");
    }
    if s.starts_with('/') || s.ends_with('/') || s.contains("//") {
        return Some("must not start or end with '/' or contain '//'");
    }
    if s.contains("..") {
        return Some("must not contain '..'");
    }
    if s.contains("@{") {
        return Some("must not contain '@{'");
    }
    if s.ends_with('.') {
        return Some("must not end with '.'");
    }
    if s.split('/')
        .any(|c| c.starts_with('.') || c.ends_with(".lock"))
    {
        return Some("no '/'-separated part may start with '.' or end with '.lock'");
    }
    None
}

/// A concrete branch or tag name: one that `git check-ref-format --branch` accepts (see
/// [`ref_name_problem`]), and so never a glob.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BranchName(String);

impl BranchName {
    /// Longest branch or tag name accepted (git allows more; no real ref needs it).
    pub const MAX_LEN: usize = 255;

    /// Validates a branch name.
    pub fn parse(s: &str) -> Result<Self, String> {
        match ref_name_problem(s) {
            None => Ok(Self(s.to_owned())),
            Some(why) => Err(format!(
                "invalid branch name {:?}: it {why}",
                crate::model::clip(s, 80)
            )),
        }
    }

    /// The branch name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BranchName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The characters that make an entry of `branches` or `tags` a glob (globset syntax).
const GLOB_CHARS: [char; 5] = ['*', '?', '[', '{', '}'];

/// One entry of a project's `branches` or `tags`: a concrete name, or a glob in `globset`
/// syntax where `*` stays within one `/`-separated part and `**` crosses them.
#[derive(Debug, Clone)]
pub struct RefPattern {
    /// The entry as written.
    text: String,
    /// The compiled glob, when the entry has glob characters.
    glob: Option<globset::GlobMatcher>,
}

impl PartialEq for RefPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl RefPattern {
    /// Validates an entry. `what` is "branch" or "tag", for the message.
    pub fn parse(s: &str, what: &str) -> Result<Self, String> {
        let is_glob = s.contains(GLOB_CHARS);
        if !is_glob && let Some(why) = ref_name_problem(s) {
            return Err(format!(
                "invalid {what} name {:?}: it {why}",
                crate::model::clip(s, 80)
            ));
        }
        let glob = if is_glob {
            // The rest of a glob must still be made of name characters: checked with each
            // glob character standing in for a plain one.
            let skeleton: String = s
                .chars()
                .map(|c| {
                    if GLOB_CHARS.contains(&c) || c == ',' {
                        'x'
                    } else {
                        c
                    }
                })
                .collect();
            // `@{` can never be part of a name, so it is refused in globs too.
            let problem = ref_name_problem(&skeleton)
                .or_else(|| s.contains("@{").then_some("must not contain '@{'"));
            if let Some(why) = problem {
                return Err(format!(
                    "invalid {what} glob {:?}: apart from its glob characters, it {why}",
                    crate::model::clip(s, 80)
                ));
            }
            let g = globset::GlobBuilder::new(s)
                .literal_separator(true)
                .backslash_escape(false)
                .build()
                .map_err(|e| {
                    format!(
                        "invalid {what} glob {:?}: {}",
                        crate::model::clip(s, 80),
                        e.kind()
                    )
                })?;
            Some(g.compile_matcher())
        } else {
            None
        };
        Ok(Self {
            text: s.to_owned(),
            glob,
        })
    }

    /// The entry as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the entry is a glob rather than one concrete name.
    pub fn is_glob(&self) -> bool {
        self.glob.is_some()
    }

    /// Whether the concrete name `name` is this entry or matches its glob.
    pub fn matches(&self, name: &str) -> bool {
        self.text == name || self.glob.as_ref().is_some_and(|g| g.is_match(name))
    }
}

impl fmt::Display for RefPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Whether `name` is a valid concrete name matched by one of `patterns`.
fn any_matches(patterns: &[RefPattern], name: &str) -> bool {
    ref_name_problem(name).is_none() && patterns.iter().any(|p| p.matches(name))
}

/// A project's `paths`: Git pushes that touch none of these files are ignored (SPEC §4.1).
#[derive(Debug, Clone)]
pub struct PathFilter {
    /// The globs as written.
    globs: Vec<String>,
    /// The compiled set (`*` within one path part, `**` across).
    set: globset::GlobSet,
}

impl PathFilter {
    /// Compiles the globs; the error names the bad one.
    pub fn new(globs: &[String]) -> Result<Self, (usize, String)> {
        let mut b = globset::GlobSetBuilder::new();
        for (i, g) in globs.iter().enumerate() {
            if g.is_empty() || g.contains('\0') {
                return Err((
                    i,
                    format!("invalid path glob {g:?}: it is empty or holds a NUL"),
                ));
            }
            let glob = globset::GlobBuilder::new(g)
                .literal_separator(true)
                .build()
                .map_err(|e| {
                    (
                        i,
                        format!(
                            "invalid path glob {:?}: {}",
                            crate::model::clip(g, 80),
                            e.kind()
                        ),
                    )
                })?;
            b.add(glob);
        }
        let set = b
            .build()
            .map_err(|e| (0, format!("invalid path globs: {e}")))?;
        Ok(Self {
            globs: globs.to_vec(),
            set,
        })
    }

    /// Whether the repository-relative path `file` matches one of the globs.
    pub fn matches(&self, file: &str) -> bool {
        self.set.is_match(file)
    }

    /// The globs as written.
    pub fn globs(&self) -> &[String] {
        &self.globs
    }
}

/// Where a project's source comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A Git URL or path; each build checks the branch head out into a fresh workspace.
    Repo(String),
    /// An existing directory the command runs in, as it is.
    Workdir(PathBuf),
}

/// One validated `[projects.NAME]` table.
#[derive(Debug, Clone)]
pub struct ProjectConfig {
    /// The project's name (the table key).
    pub name: ProjectName,
    /// The only branches any trigger may build, in config order: names or globs.
    pub branches: Vec<RefPattern>,
    /// The tags Git pushes and API triggers may build (names or globs); empty: none.
    pub tags: Vec<RefPattern>,
    /// Git pushes touching none of these files are ignored; `None`: no filter.
    pub paths: Option<PathFilter>,
    /// The build command, run as `/bin/sh -c <command>`.
    pub command: String,
    /// Where the source comes from.
    pub source: Source,
    /// Longest a build may take, counted from `initializing_on`.
    pub timeout: Duration,
    /// Whether a new build cancels older running builds of the same branch.
    pub cancel_superseded: bool,
    /// New builds of this project allowed per rolling minute.
    pub project_builds_per_minute: u32,
    /// Extra environment for the build command.
    pub env: BTreeMap<String, String>,
    /// Secret for `POST /git/{project}`; `None` disables that endpoint for this project.
    pub git_secret: Option<GitSecret>,
    /// Where the secret came from (for `check`), never the secret itself.
    pub git_secret_file: Option<PathBuf>,
    /// (v2) The sinks this project notifies; `None`: every sink (SPEC §5.1).
    pub notify: Option<Vec<String>>,
    /// (v2) Commit statuses on the Git host (SPEC §5.2).
    pub status: Option<StatusConfig>,
    /// Quiet period, params, `allow_from`, schedules (see `config/access.rs`).
    pub access: ProjectAccess,
}

impl ProjectConfig {
    /// Whether `branch` is a valid concrete branch name matched by the project's `branches`.
    pub fn has_branch(&self, branch: &str) -> bool {
        any_matches(&self.branches, branch)
    }

    /// Whether `tag` is a valid concrete tag name matched by the project's `tags`.
    pub fn has_tag(&self, tag: &str) -> bool {
        any_matches(&self.tags, tag)
    }

    /// The first entry of `branches` when it is a concrete name (the default branch of
    /// triggers that name none), else `None`.
    pub fn default_branch(&self) -> Option<&str> {
        self.branches
            .first()
            .filter(|b| !b.is_glob())
            .map(RefPattern::as_str)
    }

    /// The repository URL or path, for projects built from Git.
    pub fn repo(&self) -> Option<&str> {
        match &self.source {
            Source::Repo(url) => Some(url),
            Source::Workdir(_) => None,
        }
    }

    /// Whether a trigger may build this ref: a valid concrete name matched by `branches`
    /// (a branch) or `tags` (a tag). Hooks, API triggers, Git pushes and the runner all ask
    /// this one question.
    pub fn allows(&self, r: &crate::model::GitRef) -> bool {
        match r {
            crate::model::GitRef::Branch(b) => self.has_branch(b),
            crate::model::GitRef::Tag(t) => self.has_tag(t),
        }
    }
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address of the one HTTP listener.
    pub listen: SocketAddr,
    /// Base of printed hook URLs, without a trailing slash.
    pub public_url: String,
    /// Whether `public_url` was left out (then it follows the address actually bound, which
    /// differs from `listen` when that says port 0).
    pub public_url_is_default: bool,
    /// sled database, build logs, payloads and workspaces.
    pub state_dir: PathBuf,
    /// Larger request bodies get 413.
    pub max_body_bytes: u64,
    /// The same for `POST /git/{project}` (Git hosts send pushes of many megabytes).
    pub max_git_body_bytes: u64,
    /// Builds initializing or running at once, daemon-wide.
    pub max_concurrent_builds: usize,
    /// New builds per rolling minute, daemon-wide.
    pub builds_per_minute: u32,
    /// Default per-project limit of new builds per rolling minute.
    pub project_builds_per_minute: u32,
    /// Builds kept per project; older ones are pruned with their logs.
    pub keep_builds: usize,
    /// Per-build log cap in bytes.
    pub max_log_bytes: u64,
    /// Time between SIGTERM and SIGKILL when a build is stopped.
    pub kill_grace: Duration,
    /// On SIGTERM, how long running builds may go on before they are interrupted.
    pub shutdown_timeout: Duration,
    /// Default tracing filter (`RUST_LOG` overrides).
    pub log_level: String,
    /// Reverse proxies whose `X-Forwarded-For` is believed (SPEC §3 (v2)).
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// `[api]`.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// File holding the admin bearer token.
    pub token_file: PathBuf,
    /// `[api.tokens.NAME]`: more tokens, each limited to a scope and projects.
    pub tokens: BTreeMap<String, ApiTokenConfig>,
}

/// `[metrics]`.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Whether `GET /metrics` may be read without the admin token.
    pub public: bool,
}

/// `[ui]`: the status pages (SPEC §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiConfig {
    /// Whether `/ui/` is served at all (`false`: it answers 404).
    pub enabled: bool,
    /// Whether pages (and badges) may be read without signing in; actions still need a session.
    pub public: bool,
}

impl Default for UiConfig {
    fn default() -> Self {
        UiConfig {
            enabled: true,
            public: false,
        }
    }
}

/// The whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was loaded from (absolute).
    pub path: PathBuf,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[api]`.
    pub api: ApiConfig,
    /// `[metrics]`.
    pub metrics: MetricsConfig,
    /// `[ui]`.
    pub ui: UiConfig,
    /// `[projects.*]`, by name.
    pub projects: BTreeMap<ProjectName, Arc<ProjectConfig>>,
    /// (v2) `[notify.*]`, by name.
    pub sinks: BTreeMap<String, SinkConfig>,
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            position: None,
            key: String::new(),
            message: format!("cannot read the config file: {e}"),
        })?;
        let abs = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(path))
                .unwrap_or_else(|_| path.to_path_buf())
        };
        Self::parse(&text, &abs)
    }

    /// Validates config text as if it were the file at `path` (which must be absolute for
    /// relative paths in it to resolve sensibly).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let ctx = Ctx { text, file: path };
        let raw: RawConfig = toml::from_str(text).map_err(|e| ctx.toml_error(&e))?;
        let base = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        validate(raw, &ctx, &base)
    }

    /// Looks a project up by name.
    pub fn project(&self, name: &str) -> Option<&Arc<ProjectConfig>> {
        self.projects
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, v)| v)
    }

    /// The address client commands talk to: `listen`, with an unspecified IP replaced by
    /// loopback.
    pub fn client_addr(&self) -> SocketAddr {
        let mut addr = self.server.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            });
        }
        addr
    }

    /// A human summary for `deployhook check`.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let s = &self.server;
        let _ = writeln!(out, "config      {}", self.path.display());
        let _ = writeln!(out, "listen      {}", s.listen);
        let _ = writeln!(out, "public_url  {}", s.public_url);
        let _ = writeln!(out, "state_dir   {}", s.state_dir.display());
        let _ = writeln!(out, "token_file  {}", self.api.token_file.display());
        let _ = writeln!(
            out,
            "builds      {} at once, {} kept per project, kill grace {}",
            s.max_concurrent_builds,
            s.keep_builds,
            humantime::format_duration(s.kill_grace)
        );
        access::summarize_api(&mut out, self);
        let _ = writeln!(out, "projects    {}", self.projects.len());
        for p in self.projects.values() {
            let branches: Vec<&str> = p.branches.iter().map(RefPattern::as_str).collect();
            let source = match &p.source {
                Source::Repo(url) => format!("repo {url}"),
                Source::Workdir(dir) => format!("workdir {}", dir.display()),
            };
            let git = if p.git_secret.is_some() {
                "git webhook on"
            } else {
                "git webhook off"
            };
            let _ = writeln!(
                out,
                "  {:<20} branches [{}], {}, timeout {}, {}",
                p.name.as_str(),
                branches.join(", "),
                source,
                humantime::format_duration(p.timeout),
                git
            );
            if let Some(st) = &p.status {
                let _ = writeln!(
                    out,
                    "  {:<20} commit statuses on {} {} ({}), context {:?}",
                    "",
                    st.provider.as_str(),
                    st.repo,
                    st.api_url,
                    st.context
                );
            }
            if !p.tags.is_empty() {
                let tags: Vec<&str> = p.tags.iter().map(RefPattern::as_str).collect();
                let _ = writeln!(out, "  {:<20} tags [{}]", "", tags.join(", "));
            }
            if let Some(paths) = &p.paths {
                let _ = writeln!(out, "  {:<20} paths [{}]", "", paths.globs().join(", "));
            }
            access::summarize(&mut out, p);
        }
        let _ = write!(out, "{}", sinks::summary(self));
        out
    }
}

/// The config in force, replaceable by a reload (SIGHUP). Readers take a cheap `Arc` snapshot,
/// so a build keeps the settings it started with while a reload swaps the rest.
#[derive(Debug)]
pub struct SharedConfig(std::sync::RwLock<Arc<Config>>);

impl SharedConfig {
    /// Wraps a loaded config.
    pub fn new(c: Config) -> Self {
        Self(std::sync::RwLock::new(Arc::new(c)))
    }

    /// The config in force now.
    pub fn get(&self) -> Arc<Config> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Puts a new config in force.
    pub fn replace(&self, c: Config) {
        match self.0.write() {
            Ok(mut g) => *g = Arc::new(c),
            Err(p) => *p.into_inner() = Arc::new(c),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Phase one: the raw mirror.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    ui: RawUi,
    #[serde(default)]
    projects: BTreeMap<Spanned<String>, RawProject>,
    #[serde(default)]
    notify: BTreeMap<Spanned<String>, sinks::RawSink>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    public_url: Option<Spanned<String>>,
    state_dir: Option<Spanned<String>>,
    max_body_bytes: Option<Spanned<i64>>,
    max_git_body_bytes: Option<Spanned<i64>>,
    max_concurrent_builds: Option<Spanned<i64>>,
    builds_per_minute: Option<Spanned<i64>>,
    project_builds_per_minute: Option<Spanned<i64>>,
    keep_builds: Option<Spanned<i64>>,
    max_log_bytes: Option<Spanned<i64>>,
    kill_grace: Option<Spanned<String>>,
    shutdown_timeout: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    trusted_proxies: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    token_file: Option<Spanned<String>>,
    #[serde(default)]
    tokens: BTreeMap<Spanned<String>, access::RawApiToken>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    public: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUi {
    enabled: Option<bool>,
    public: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProject {
    branches: Spanned<Vec<Spanned<String>>>,
    tags: Option<Spanned<Vec<Spanned<String>>>>,
    paths: Option<Spanned<Vec<Spanned<String>>>>,
    command: Spanned<String>,
    repo: Option<Spanned<String>>,
    workdir: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    cancel_superseded: Option<bool>,
    project_builds_per_minute: Option<Spanned<i64>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, Spanned<String>>,
    git_secret_file: Option<Spanned<String>>,
    notify: Option<Spanned<Vec<Spanned<String>>>>,
    status: Option<sinks::RawStatus>,
    quiet_period: Option<Spanned<String>>,
    max_quiet_period: Option<Spanned<String>>,
    params: Option<Spanned<Vec<Spanned<String>>>>,
    allow_from: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    schedule: Vec<access::RawSchedule>,
}

// ---------------------------------------------------------------------------------------------
// Phase two: validation.

/// What error rendering needs: the text (for line/column) and the file name.
struct Ctx<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Ctx<'_> {
    fn err(
        &self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            position: span.map(|s| line_col(self.text, s.start)),
            key: key.into(),
            message: msg.into(),
        }
    }

    /// An error about the string `value` at `key`: its value, quoted and clipped, then `is`
    /// ("is not a configured project").
    fn err_about(&self, value: &Spanned<String>, key: impl Into<String>, is: &str) -> ConfigError {
        let quoted = format!("{:?} {is}", crate::model::clip(value.get_ref(), 80));
        self.err(Some(value.span()), key, quoted)
    }

    /// Turns a TOML/serde error into our one-line form, recovering the key path from the
    /// table header above the error position.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        let message = e.message().trim().replace('\n', " ");
        let span = e.span();
        let mut key = span
            .as_ref()
            .map(|s| key_path_at(self.text, s.clone()))
            .unwrap_or_default();
        // "missing field `x`" points at the table: name the missing key too.
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            key = if key.is_empty() {
                field.to_owned()
            } else {
                format!("{key}.{field}")
            };
        }
        self.err(span, key, message)
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// Best-effort dotted key path of the TOML at `span`: the nearest `[table]` header above it,
/// plus the key on the span's line (or the span's own text when it is a key).
fn key_path_at(text: &str, span: Range<usize>) -> String {
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or("");
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let mut table = String::new();
    for line in before[..line_start].lines().rev() {
        let t = line.trim();
        if t.starts_with('[') {
            table = t
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned();
            break;
        }
    }
    // The line the span starts on.
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    if line.starts_with('[') {
        // The span is on a table header itself (e.g. a missing field in that table).
        return line
            .trim_start_matches('[')
            .split(']')
            .next()
            .unwrap_or("")
            .trim()
            .to_owned();
    }
    let key = match line.split_once('=') {
        Some((k, _)) => k.trim().trim_matches('"').to_owned(),
        None => String::new(),
    };
    match (table.is_empty(), key.is_empty()) {
        (true, _) => key,
        (false, true) => table,
        (false, false) => format!("{table}.{key}"),
    }
}

fn span_of<T>(s: &Spanned<T>) -> Option<Range<usize>> {
    Some(s.span())
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    // Drop `.` components so paths print cleanly; `..` is kept (symlinks make it meaningful).
    joined
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

fn duration(
    ctx: &Ctx<'_>,
    key: &str,
    v: Option<&Spanned<String>>,
    default: Duration,
    allow_zero: bool,
) -> Result<Duration, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    let d = humantime::parse_duration(v.get_ref().trim()).map_err(|e| {
        ctx.err(
            span_of(v),
            key,
            format!(
                "invalid duration {:?} ({e}): write it like \"90s\", \"15m\" or \"1h\"",
                v.get_ref()
            ),
        )
    })?;
    if d.is_zero() && !allow_zero {
        return Err(ctx.err(span_of(v), key, "must be longer than zero"));
    }
    Ok(d)
}

fn count(
    ctx: &Ctx<'_>,
    key: &str,
    v: Option<&Spanned<i64>>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    let n = *v.get_ref();
    if n < 0 || (n as u64) < min || (n as u64) > max {
        return Err(ctx.err(
            span_of(v),
            key,
            format!("must be a whole number from {min} to {max}, not {n}"),
        ));
    }
    Ok(n as u64)
}

fn validate(raw: RawConfig, ctx: &Ctx<'_>, base: &Path) -> Result<Config, ConfigError> {
    let s = &raw.server;
    let listen = match &s.listen {
        None => SocketAddr::from(([127, 0, 0, 1], 8787)),
        Some(v) => v.get_ref().trim().parse::<SocketAddr>().map_err(|_| {
            ctx.err(
                span_of(v),
                "server.listen",
                format!(
                    "invalid listen address {:?}: write an IP and port, like \"127.0.0.1:8787\" or \"0.0.0.0:8787\"",
                    v.get_ref()
                ),
            )
        })?,
    };
    let public_url = match &s.public_url {
        None => {
            let mut a = listen;
            if a.ip().is_unspecified() {
                a.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
            }
            format!("http://{a}")
        }
        Some(v) => {
            let u = v.get_ref().trim().trim_end_matches('/');
            let rest = u
                .strip_prefix("http://")
                .or_else(|| u.strip_prefix("https://"));
            match rest {
                Some(r)
                    if !r.is_empty() && !r.chars().any(|c| c.is_whitespace() || c.is_control()) =>
                {
                    u.to_owned()
                }
                _ => {
                    return Err(ctx.err(
                        span_of(v),
                        "server.public_url",
                        format!(
                            "invalid public_url {:?}: write a base URL like \"https://deploy.example.com\"",
                            v.get_ref()
                        ),
                    ));
                }
            }
        }
    };
    let state_dir = match &s.state_dir {
        None => resolve(base, "state"),
        Some(v) if v.get_ref().trim().is_empty() => {
            return Err(ctx.err(span_of(v), "server.state_dir", "must not be empty"));
        }
        Some(v) => resolve(base, v.get_ref()),
    };
    let max_body_bytes = count(
        ctx,
        "server.max_body_bytes",
        s.max_body_bytes.as_ref(),
        1_048_576,
        0,
        MAX_BODY_LIMIT,
    )?;
    let max_git_body_bytes = count(
        ctx,
        "server.max_git_body_bytes",
        s.max_git_body_bytes.as_ref(),
        DEFAULT_MAX_GIT_BODY_BYTES,
        0,
        MAX_BODY_LIMIT,
    )?;
    let max_concurrent_builds = count(
        ctx,
        "server.max_concurrent_builds",
        s.max_concurrent_builds.as_ref(),
        2,
        1,
        1024,
    )? as usize;
    let builds_per_minute = count(
        ctx,
        "server.builds_per_minute",
        s.builds_per_minute.as_ref(),
        100,
        1,
        1_000_000,
    )? as u32;
    let project_builds_per_minute = count(
        ctx,
        "server.project_builds_per_minute",
        s.project_builds_per_minute.as_ref(),
        10,
        1,
        1_000_000,
    )? as u32;
    let keep_builds = count(
        ctx,
        "server.keep_builds",
        s.keep_builds.as_ref(),
        100,
        1,
        1_000_000,
    )? as usize;
    let max_log_bytes = count(
        ctx,
        "server.max_log_bytes",
        s.max_log_bytes.as_ref(),
        10_485_760,
        1024,
        1 << 40,
    )?;
    let kill_grace = duration(
        ctx,
        "server.kill_grace",
        s.kill_grace.as_ref(),
        Duration::from_secs(10),
        true,
    )?;
    let shutdown_timeout = duration(
        ctx,
        "server.shutdown_timeout",
        s.shutdown_timeout.as_ref(),
        Duration::from_secs(30),
        true,
    )?;
    let log_level = match &s.log_level {
        None => "info".to_owned(),
        Some(v) => {
            let l = v.get_ref().trim();
            if tracing_subscriber::EnvFilter::try_new(l).is_err() || l.is_empty() {
                return Err(ctx.err(
                    span_of(v),
                    "server.log_level",
                    format!("invalid log level {l:?}: use error, warn, info, debug or trace"),
                ));
            }
            l.to_owned()
        }
    };
    let token_file = match &raw.api.token_file {
        None => resolve(base, "admin.token"),
        Some(v) if v.get_ref().trim().is_empty() => {
            return Err(ctx.err(span_of(v), "api.token_file", "must not be empty"));
        }
        Some(v) => resolve(base, v.get_ref()),
    };

    let sinks = sinks::validate_sinks(ctx, base, raw.notify)?;
    let trusted_proxies = access::trusted_proxies(ctx, s.trusted_proxies.as_ref())?;

    let mut projects = BTreeMap::new();
    for (name, mut p) in raw.projects {
        let key = format!("projects.{}", name.get_ref());
        let pname =
            ProjectName::parse(name.get_ref()).map_err(|m| ctx.err(span_of(&name), &key, m))?;
        let (raw_notify, raw_status) = (p.notify.take(), p.status.take());
        let mut project =
            validate_project(ctx, base, &key, pname.clone(), p, project_builds_per_minute)?;
        project.notify = sinks::validate_notify(ctx, &key, raw_notify.as_ref(), &sinks)?;
        project.status = sinks::validate_status(ctx, base, &key, raw_status.as_ref())?;
        projects.insert(pname, Arc::new(project));
    }
    let names = projects.keys().map(|n| n.as_str().to_owned()).collect();
    let tokens = access::api_tokens(ctx, base, &raw.api.tokens, &token_file, &names)?;

    Ok(Config {
        path: ctx.file.to_path_buf(),
        server: ServerConfig {
            listen,
            public_url_is_default: s.public_url.is_none(),
            public_url,
            state_dir,
            max_body_bytes,
            max_git_body_bytes,
            max_concurrent_builds,
            builds_per_minute,
            project_builds_per_minute,
            keep_builds,
            max_log_bytes,
            kill_grace,
            shutdown_timeout,
            log_level,
            trusted_proxies,
        },
        api: ApiConfig { token_file, tokens },
        metrics: MetricsConfig {
            public: raw.metrics.public.unwrap_or(false),
        },
        ui: UiConfig {
            enabled: raw.ui.enabled.unwrap_or(true),
            public: raw.ui.public.unwrap_or(false),
        },
        projects,
        sinks,
    })
}

/// Validates `branches` or `tags` (`what` is "branch" or "tag"): at least one entry, each a
/// name or glob, none twice.
fn ref_patterns(
    ctx: &Ctx<'_>,
    key: &str,
    list: &Spanned<Vec<Spanned<String>>>,
    what: &str,
) -> Result<Vec<RefPattern>, ConfigError> {
    if list.get_ref().is_empty() {
        let hint = if what == "tag" {
            "must list at least one tag (leave the key out to build no tags)"
        } else {
            "must list at least one branch"
        };
        return Err(ctx.err(span_of(list), key, hint));
    }
    let mut out: Vec<RefPattern> = Vec::new();
    for b in list.get_ref() {
        let pattern =
            RefPattern::parse(b.get_ref(), what).map_err(|m| ctx.err(span_of(b), key, m))?;
        if out.contains(&pattern) {
            return Err(ctx.err(
                span_of(b),
                key,
                format!("{what} {:?} is listed twice", b.get_ref()),
            ));
        }
        out.push(pattern);
    }
    Ok(out)
}

/// Validates `paths`: at least one glob, each one valid.
fn path_filter(
    ctx: &Ctx<'_>,
    key: &str,
    list: &Spanned<Vec<Spanned<String>>>,
) -> Result<PathFilter, ConfigError> {
    if list.get_ref().is_empty() {
        return Err(ctx.err(
            span_of(list),
            key,
            "must list at least one glob (leave the key out to build on every change)",
        ));
    }
    let globs: Vec<String> = list.get_ref().iter().map(|g| g.get_ref().clone()).collect();
    PathFilter::new(&globs).map_err(|(i, m)| ctx.err(span_of(&list.get_ref()[i]), key, m))
}

fn validate_project(
    ctx: &Ctx<'_>,
    base: &Path,
    key: &str,
    name: ProjectName,
    p: RawProject,
    default_per_minute: u32,
) -> Result<ProjectConfig, ConfigError> {
    let branches = ref_patterns(ctx, &format!("{key}.branches"), &p.branches, "branch")?;
    let tags = match &p.tags {
        None => Vec::new(),
        Some(t) => ref_patterns(ctx, &format!("{key}.tags"), t, "tag")?,
    };
    let paths = match &p.paths {
        None => None,
        Some(list) => Some(path_filter(ctx, &format!("{key}.paths"), list)?),
    };
    let command = p.command.get_ref().clone();
    if command.trim().is_empty() {
        return Err(ctx.err(
            span_of(&p.command),
            format!("{key}.command"),
            "must not be empty",
        ));
    }
    if command.contains('\0') {
        return Err(ctx.err(
            span_of(&p.command),
            format!("{key}.command"),
            "must not contain a NUL byte",
        ));
    }
    let source = match (&p.repo, &p.workdir) {
        (Some(repo), _) => {
            let url = repo.get_ref().trim();
            if url.is_empty() || url.starts_with('-') || url.chars().any(|c| c.is_control()) {
                return Err(ctx.err(
                    span_of(repo),
                    format!("{key}.repo"),
                    "must be a URL or path git can fetch (not empty, not starting with '-')",
                ));
            }
            // A local path is resolved like every other relative path; URLs stay as they are.
            let looks_like_url = url.contains("://")
                || (url.contains(':') && !url.starts_with('.') && !url.starts_with('/'));
            if looks_like_url {
                Source::Repo(url.to_owned())
            } else {
                Source::Repo(resolve(base, url).to_string_lossy().into_owned())
            }
        }
        (None, Some(w)) => {
            let dir = resolve(base, w.get_ref());
            if !dir.is_dir() {
                return Err(ctx.err(
                    span_of(w),
                    format!("{key}.workdir"),
                    format!("{} is not an existing directory", dir.display()),
                ));
            }
            Source::Workdir(dir)
        }
        (None, None) => {
            return Err(ctx.err(
                span_of(&p.command),
                format!("{key}.workdir"),
                "is required when repo is not set: say where the command runs",
            ));
        }
    };
    let timeout = duration(
        ctx,
        &format!("{key}.timeout"),
        p.timeout.as_ref(),
        Duration::from_secs(3600),
        false,
    )?;
    let per_minute = count(
        ctx,
        &format!("{key}.project_builds_per_minute"),
        p.project_builds_per_minute.as_ref(),
        u64::from(default_per_minute),
        1,
        1_000_000,
    )? as u32;
    let mut env = BTreeMap::new();
    for (k, v) in p.env {
        let ekey = format!("{key}.env.{}", k.get_ref());
        let name = k.get_ref();
        let valid_name = !name.is_empty()
            && !name.as_bytes()[0].is_ascii_digit()
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            return Err(ctx.err(
                span_of(&k),
                &ekey,
                "invalid variable name: use letters, digits and '_', not starting with a digit",
            ));
        }
        if name.starts_with("DEPLOYHOOK_") {
            return Err(ctx.err(
                span_of(&k),
                &ekey,
                "DEPLOYHOOK_* variables are set by deployhook itself",
            ));
        }
        if v.get_ref().contains('\0') {
            return Err(ctx.err(span_of(&v), &ekey, "must not contain a NUL byte"));
        }
        env.insert(name.clone(), v.get_ref().clone());
    }
    let (git_secret, git_secret_file) = match &p.git_secret_file {
        None => (None, None),
        Some(f) => {
            let path = resolve(base, f.get_ref());
            let skey = format!("{key}.git_secret_file");
            let text = std::fs::read_to_string(&path).map_err(|e| {
                ctx.err(
                    span_of(f),
                    &skey,
                    format!(
                        "cannot read the Git secret of project {name} from {}: {e}",
                        path.display()
                    ),
                )
            })?;
            let secret = text.trim_end_matches(['\n', '\r']);
            if secret.is_empty() {
                return Err(ctx.err(
                    span_of(f),
                    &skey,
                    format!(
                        "the Git secret file {} of project {name} is empty",
                        path.display()
                    ),
                ));
            }
            (Some(GitSecret::new(secret.as_bytes().to_vec())), Some(path))
        }
    };
    let access = access::project_access(
        ctx,
        key,
        &branches,
        access::RawProjectAccess {
            quiet_period: p.quiet_period.as_ref(),
            max_quiet_period: p.max_quiet_period.as_ref(),
            params: p.params.as_ref(),
            allow_from: p.allow_from.as_ref(),
            schedule: &p.schedule,
        },
    )?;
    Ok(ProjectConfig {
        access,
        name,
        branches,
        tags,
        paths,
        command,
        source,
        timeout,
        cancel_superseded: p.cancel_superseded.unwrap_or(true),
        project_builds_per_minute: per_minute,
        env,
        git_secret,
        git_secret_file,
        notify: None,
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `text` parsed as if read from `/tmp/deploy.toml`; shared with the submodules' tests.
    pub(super) fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/tmp/deploy.toml"))
    }

    const MINIMAL: &str =
        "[projects.site]\nbranches = [\"main\"]\ncommand = \"true\"\nworkdir = \"/tmp\"\n";

    #[test]
    fn defaults_match_the_spec() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8787".parse().unwrap());
        assert_eq!(c.server.public_url, "http://127.0.0.1:8787");
        assert_eq!(c.server.state_dir, PathBuf::from("/tmp/state"));
        assert_eq!(c.server.max_body_bytes, 1_048_576);
        assert_eq!(c.server.max_concurrent_builds, 2);
        assert_eq!(c.server.builds_per_minute, 100);
        assert_eq!(c.server.project_builds_per_minute, 10);
        assert_eq!(c.server.keep_builds, 100);
        assert_eq!(c.server.max_log_bytes, 10_485_760);
        assert_eq!(c.server.kill_grace, Duration::from_secs(10));
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.server.log_level, "info");
        assert_eq!(c.api.token_file, PathBuf::from("/tmp/admin.token"));
        assert!(!c.metrics.public);
        let p = c.project("site").unwrap();
        assert_eq!(p.timeout, Duration::from_secs(3600));
        assert!(p.cancel_superseded);
        assert_eq!(p.project_builds_per_minute, 10);
        assert_eq!(p.source, Source::Workdir(PathBuf::from("/tmp")));
    }

    #[test]
    fn ui_keys_default_and_parse() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            c.ui,
            UiConfig {
                enabled: true,
                public: false
            }
        );
        let c = parse(&format!("[ui]\nenabled = false\npublic = true\n{MINIMAL}")).unwrap();
        assert_eq!(
            c.ui,
            UiConfig {
                enabled: false,
                public: true
            }
        );
        let e = parse(&format!("[ui]\npublik = true\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.key, "ui.publik", "{e}");
        let e = parse(&format!("[ui]\npublic = \"yes\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
    }

    #[test]
    fn unknown_key_names_its_line_and_key() {
        let e = parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(3), "{e}");
        assert_eq!(e.key, "server.lisen", "{e}");
        assert!(
            e.to_string()
                .starts_with("/tmp/deploy.toml:3:1: server.lisen: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_in_a_project() {
        let e = parse(&format!("{MINIMAL}comand = \"x\"\n")).unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(5), "{e}");
        assert_eq!(e.key, "projects.site.comand", "{e}");
    }

    #[test]
    fn bad_duration_is_reported_with_position() {
        let e = parse("[server]\nkill_grace = \"ten seconds\"\n").unwrap_err();
        assert_eq!(e.position, Some((2, 14)), "{e}");
        assert_eq!(e.key, "server.kill_grace");
        assert!(e.message.contains("invalid duration"), "{e}");
        let e = parse(&format!("{MINIMAL}timeout = \"0s\"\n")).unwrap_err();
        assert_eq!(e.key, "projects.site.timeout");
    }

    #[test]
    fn durations_parse() {
        let c = parse(&format!("[server]\nkill_grace = \"90s\"\nshutdown_timeout = \"15m\"\n{MINIMAL}timeout = \"1h\"\n")).unwrap();
        assert_eq!(c.server.kill_grace, Duration::from_secs(90));
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(900));
        assert_eq!(
            c.project("site").unwrap().timeout,
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn bad_branches_are_rejected() {
        for bad in [
            "main;rm -rf /",
            "--upload-pack=x",
            "..",
            "a..b",
            "with space",
            "tab\tx",
            "new\nline",
            "nul\u{0}",
            "-x",
            "/x",
            "x/",
            "a//b",
            ".hidden",
            "x.lock",
            "a@{1}",
            "HEAD",
            "a:b",
            "a\\b",
            "",
        ] {
            let text = format!(
                "[projects.site]\nbranches = [{}]\ncommand = \"true\"\nworkdir = \"/tmp\"\n",
                toml::Value::String(bad.to_owned())
            );
            let e = parse(&text).unwrap_err();
            assert_eq!(e.key, "projects.site.branches", "{bad:?}: {e}");
            assert_eq!(e.position.map(|p| p.0), Some(2), "{bad:?}: {e}");
            assert!(e.message.contains("invalid branch"), "{bad:?}: {e}");
        }
        let long = "a".repeat(10_000);
        assert!(BranchName::parse(&long).is_err());
        // Whatever git accepts, Unicode and shell characters included: a name only reaches
        // git as one argv element after `--`.
        for good in [
            "main",
            "release/1.2",
            "feature_x-y",
            "v1+build",
            "déploiement",
            "ü/ß",
            "$(id)",
            "@",
            "a{b}",
        ] {
            assert!(BranchName::parse(good).is_ok(), "{good}");
        }
    }

    /// The rules agree with the real `git check-ref-format --branch` on a table of names.
    #[test]
    fn ref_names_agree_with_git_check_ref_format() {
        let names = [
            "main",
            "-x",
            "HEAD",
            "@",
            "déploiement",
            "ü/ß",
            "$(id)",
            "a..b",
            "a b",
            "x.lock",
            "a/.b",
            "a{b}",
            "a@{b",
            "@{-1}",
            "x/",
            "a//b",
            "a.",
            "refs/heads/x",
            "a:b",
            "a\\b",
            "a\u{7f}b",
            "a@b",
            "._x",
            "a/b.lock/c",
            "main;rm",
            "a~1",
            "a^",
            "a?",
            "a*",
            "a[b",
            "release/v1.2.3",
            "a/b/c",
            ".",
            "/",
            "a.lock/b",
            "x.lockx",
            "emoji-🚀",
            "tab\tx",
            "日本語/ブランチ",
            "a..",
            "..a",
            "a/./b",
            "-",
        ];
        let mut checked = 0;
        for name in names {
            let Ok(out) = std::process::Command::new("git")
                .args(["check-ref-format", "--branch", name])
                .current_dir(std::env::temp_dir())
                .output()
            else {
                eprintln!("git is not installed; skipping the comparison");
                return;
            };
            assert_eq!(
                out.status.success(),
                ref_name_problem(name).is_none(),
                "{name:?}: git says {}, we say {:?}",
                String::from_utf8_lossy(&out.stderr).trim(),
                ref_name_problem(name)
            );
            checked += 1;
        }
        assert_eq!(checked, names.len());
    }

    #[test]
    fn branch_and_tag_globs() {
        let c = parse(&format!(
            "{}tags = [\"v*\", \"release-{{1,2}}\"]\n",
            MINIMAL.replace(
                "[\"main\"]",
                "[\"main\", \"release/*\", \"hotfix/**\", \"a{b}\"]"
            )
        ))
        .unwrap();
        let p = c.project("site").unwrap();
        assert!(p.has_branch("main"));
        assert!(p.has_branch("release/1.2"));
        assert!(!p.has_branch("release/1.2/x"), "* stays within one part");
        assert!(p.has_branch("hotfix/a/b/c"), "** crosses parts");
        assert!(
            p.has_branch("a{b}"),
            "a name with braces is matched literally too"
        );
        assert!(!p.has_branch("release/*"), "a glob is not a concrete name");
        assert!(!p.has_branch("release/a..b"), "invalid names never match");
        assert!(p.has_tag("v1.2.0"));
        assert!(p.has_tag("release-2"));
        assert!(!p.has_tag("release-3"));
        assert!(!p.has_tag("main"));
        assert_eq!(p.default_branch(), Some("main"));
        let g = parse(&MINIMAL.replace("[\"main\"]", "[\"release/*\", \"main\"]")).unwrap();
        assert_eq!(g.project("site").unwrap().default_branch(), None);
        assert!(g.project("site").unwrap().tags.is_empty());
        for (bad, what) in [
            ("branches = [\"rel..*\"]", "branches"),
            ("branches = [\"[z-a]\"]", "branches"),
            ("branches = [\"a b*\"]", "branches"),
            ("branches = [\"*\", \"*\"]", "branches"),
            ("branches = [\"main\"]\ntags = []", "tags"),
            ("branches = [\"main\"]\ntags = [\"v 1\"]", "tags"),
            ("branches = [\"main\"]\ntags = [\"{v*\"]", "tags"),
        ] {
            let text = format!("[projects.site]\n{bad}\ncommand = \"true\"\nworkdir = \"/tmp\"\n");
            let e = parse(&text).unwrap_err();
            assert_eq!(e.key, format!("projects.site.{what}"), "{bad}: {e}");
            assert!(e.position.is_some(), "{bad}: {e}");
        }
    }

    #[test]
    fn paths_and_max_git_body_bytes() {
        let c = parse(&format!(
            "{MINIMAL}paths = [\"site/**\", \"package.json\", \"*.md\"]\n"
        ))
        .unwrap();
        assert_eq!(c.server.max_git_body_bytes, 26_214_400);
        let paths = c.project("site").unwrap().paths.clone().unwrap();
        assert!(paths.matches("site/a/b.html"));
        assert!(paths.matches("package.json"));
        assert!(paths.matches("README.md"));
        assert!(!paths.matches("docs/README.md"), "* stays within one part");
        assert!(!paths.matches("sub/package.json"));
        assert!(
            parse(MINIMAL)
                .unwrap()
                .project("site")
                .unwrap()
                .paths
                .is_none()
        );
        let e = parse(&format!("{MINIMAL}paths = []\n")).unwrap_err();
        assert_eq!(e.key, "projects.site.paths", "{e}");
        let e = parse(&format!("{MINIMAL}paths = [\"ok/**\", \"[z-a]\"]\n")).unwrap_err();
        assert_eq!(e.key, "projects.site.paths", "{e}");
        assert_eq!(e.position, Some((5, 19)), "{e}");
        let c = parse(&format!("[server]\nmax_git_body_bytes = 1000\n{MINIMAL}")).unwrap();
        assert_eq!(c.server.max_git_body_bytes, 1000);
        let e = parse("[server]\nmax_git_body_bytes = 99999999999\n").unwrap_err();
        assert_eq!(
            e.to_string().split(": ").next(),
            Some("/tmp/deploy.toml:2:22"),
            "{e}"
        );
        assert_eq!(e.key, "server.max_git_body_bytes");
    }

    #[test]
    fn missing_workdir_without_repo() {
        let e = parse("[projects.site]\nbranches = [\"main\"]\ncommand = \"true\"\n").unwrap_err();
        assert_eq!(e.key, "projects.site.workdir", "{e}");
        assert!(e.message.contains("required when repo is not set"), "{e}");
    }

    #[test]
    fn missing_command_is_named() {
        let e = parse("[projects.site]\nbranches = [\"main\"]\nworkdir = \"/tmp\"\n").unwrap_err();
        assert_eq!(e.key, "projects.site.command", "{e}");
        assert!(e.to_string().contains("missing field"), "{e}");
    }

    #[test]
    fn bad_project_names() {
        for bad in ["Site", "-site", "_x", &"a".repeat(64), "sité"] {
            let text = format!(
                "[projects.{}]\nbranches = [\"main\"]\ncommand = \"true\"\nworkdir = \"/tmp\"\n",
                toml::Value::String(bad.to_owned())
            );
            let e = parse(&text).unwrap_err();
            assert!(e.message.contains("invalid project name"), "{bad}: {e}");
        }
        assert!(ProjectName::parse(&"a".repeat(63)).is_ok());
        assert!(ProjectName::parse("0-site_x").is_ok());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_dir() {
        let c = Config::parse(
            "[server]\nstate_dir = \"st\"\n[api]\ntoken_file = \"t/admin\"\n[projects.x]\nbranches=[\"main\"]\ncommand=\"true\"\nrepo = \"../repo.git\"\n",
            Path::new("/etc/dh/deploy.toml"),
        )
        .unwrap();
        assert_eq!(c.server.state_dir, PathBuf::from("/etc/dh/st"));
        assert_eq!(c.api.token_file, PathBuf::from("/etc/dh/t/admin"));
        assert_eq!(
            c.project("x").unwrap().source,
            Source::Repo("/etc/dh/../repo.git".into())
        );
        let c = Config::parse(
            "[projects.x]\nbranches=[\"main\"]\ncommand=\"true\"\nrepo = \"git@github.com:acme/site.git\"\n",
            Path::new("/etc/dh/deploy.toml"),
        )
        .unwrap();
        assert_eq!(
            c.project("x").unwrap().source,
            Source::Repo("git@github.com:acme/site.git".into())
        );
    }

    #[test]
    fn bad_numbers_and_addresses() {
        let e = parse("[server]\nmax_concurrent_builds = 0\n").unwrap_err();
        assert_eq!(e.key, "server.max_concurrent_builds");
        let e = parse("[server]\nlisten = \"localhost\"\n").unwrap_err();
        assert_eq!(e.key, "server.listen");
        let e = parse("[server]\npublic_url = \"ftp://x\"\n").unwrap_err();
        assert_eq!(e.key, "server.public_url");
        let e = parse("[server]\nmax_body_bytes = \"big\"\n").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
    }

    #[test]
    fn env_rules() {
        let c = parse(&format!("{MINIMAL}env = {{ NODE_ENV = \"production\" }}\n")).unwrap();
        assert_eq!(c.project("site").unwrap().env["NODE_ENV"], "production");
        let e = parse(&format!(
            "{MINIMAL}env = {{ DEPLOYHOOK_PROJECT = \"x\" }}\n"
        ))
        .unwrap_err();
        assert!(e.key.ends_with("env.DEPLOYHOOK_PROJECT"), "{e}");
        let e = parse(&format!("{MINIMAL}env = {{ \"A-B\" = \"x\" }}\n")).unwrap_err();
        assert!(e.message.contains("invalid variable name"), "{e}");
    }

    #[test]
    fn git_secret_file_errors_name_the_file_and_project() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("deploy.toml");
        let text = format!("{MINIMAL}git_secret_file = \"missing.secret\"\n");
        let e = Config::parse(&text, &cfg).unwrap_err();
        assert!(
            e.message.contains("missing.secret") && e.message.contains("site"),
            "{e}"
        );
        std::fs::write(dir.path().join("missing.secret"), "\n").unwrap();
        let e = Config::parse(&text, &cfg).unwrap_err();
        assert!(e.message.contains("is empty"), "{e}");
        std::fs::write(dir.path().join("missing.secret"), "s3cret\n").unwrap();
        let c = Config::parse(&text, &cfg).unwrap();
        assert!(
            c.project("site")
                .unwrap()
                .git_secret
                .as_ref()
                .unwrap()
                .matches(b"s3cret")
        );
    }

    #[test]
    fn unspecified_listen_means_loopback_for_clients() {
        let c = parse("[server]\nlisten = \"0.0.0.0:9000\"\n").unwrap();
        assert_eq!(c.client_addr(), "127.0.0.1:9000".parse().unwrap());
        assert_eq!(c.server.public_url, "http://127.0.0.1:9000");
    }
}
