//! The (v2) keys for what leaves the daemon (SPEC §3, §5): `[notify.NAME]` sinks, a project's
//! `notify = [...]` and `[projects.P.status]`. Kept apart from the rest of the config so that
//! the outbox's keys read as one piece.
//!
//! Like `git_secret_file`, every file these keys name (`url_file`, `secret_file`,
//! `token_file`) is read at load time: a SIGHUP re-reads them with the rest, and a reload that
//! cannot read one is rejected whole. The values are held in newtypes whose `Debug` is
//! redacted, and a sink URL is only ever shown as `scheme://host` ([`SinkUrl::redacted`]):
//! Slack and Discord webhook URLs carry their secret in the path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Ctx, resolve, span_of};

/// A notification event (SPEC §5.1).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Event {
    /// A build entered `running`.
    Started,
    /// Outcome `success` (and no recovery).
    Succeeded,
    /// Outcome `fail`.
    Failed,
    /// Outcome `timed_out`.
    TimedOut,
    /// Cancelled through the API (superseded builds are not reported).
    Cancelled,
    /// Outcome `interrupted`.
    Interrupted,
    /// A success after a build of the same target that did not succeed.
    Recovered,
    /// `POST /api/notifications/test` (never stored in the outbox).
    Test,
}

impl Event {
    /// Every event a sink may list in `events`.
    pub const CONFIGURABLE: [Event; 7] = [
        Event::Started,
        Event::Succeeded,
        Event::Failed,
        Event::TimedOut,
        Event::Cancelled,
        Event::Interrupted,
        Event::Recovered,
    ];

    /// The word of `events` and of the JSON `type` (`build.<word>`).
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Started => "started",
            Event::Succeeded => "succeeded",
            Event::Failed => "failed",
            Event::TimedOut => "timed_out",
            Event::Cancelled => "cancelled",
            Event::Interrupted => "interrupted",
            Event::Recovered => "recovered",
            Event::Test => "test",
        }
    }

    fn parse(s: &str) -> Option<Event> {
        Event::CONFIGURABLE.into_iter().find(|e| e.as_str() == s)
    }
}

/// The body format of a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkFormat {
    /// Standard Webhooks JSON, signed when a secret is set.
    Json,
    /// A Slack incoming webhook.
    Slack,
    /// A Discord webhook.
    Discord,
}

/// A sink's URL. Slack and Discord put the credential in the path, so it is never shown
/// whole: `Debug` and [`SinkUrl::redacted`] give `scheme://host` only.
#[derive(Clone, PartialEq, Eq)]
pub struct SinkUrl(String);

impl SinkUrl {
    /// The whole URL, for the request only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `scheme://host[:port]`: what logs and errors may show.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

/// `scheme://host[:port]` of a URL (everything after the authority is dropped, and so is
/// any `user:password@`).
pub fn redact_url(url: &str) -> String {
    match url.parse::<http::Uri>() {
        Ok(u) => format!(
            "{}://{}",
            u.scheme_str().unwrap_or("?"),
            u.authority()
                .map(|a| a.as_str().rsplit('@').next().unwrap_or("").to_owned())
                .unwrap_or_default()
        ),
        Err(_) => "(invalid URL)".to_owned(),
    }
}

impl fmt::Debug for SinkUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SinkUrl({})", self.redacted())
    }
}

/// A secret read from a file (a status token, the key of a webhook signing secret).
#[derive(Clone, PartialEq, Eq)]
pub struct FileSecret(Vec<u8>);

impl FileSecret {
    /// A secret made in a unit test.
    #[cfg(test)]
    pub(crate) fn for_tests(b: &[u8]) -> FileSecret {
        FileSecret(b.to_vec())
    }

    /// The secret's bytes, for the request only.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for FileSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FileSecret(<redacted>)")
    }
}

/// One validated `[notify.NAME]`.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// The table key.
    pub name: String,
    /// Where to POST.
    pub url: SinkUrl,
    /// Body format.
    pub format: SinkFormat,
    /// The HMAC key (the base64-decoded part after `whsec_`), json only.
    pub secret: Option<FileSecret>,
    /// Events this sink hears.
    pub events: BTreeSet<Event>,
}

impl SinkConfig {
    /// Whether this sink hears `event` (SPEC §5.1: `recovered` also goes to sinks that
    /// listen to `succeeded`).
    pub fn hears(&self, event: Event) -> bool {
        self.events.contains(&event)
            || (event == Event::Recovered && self.events.contains(&Event::Succeeded))
    }
}

/// A commit-status provider (SPEC §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Provider {
    /// GitHub.
    Github,
    /// Gitea.
    Gitea,
    /// Forgejo.
    Forgejo,
    /// GitLab.
    Gitlab,
    /// Bitbucket Cloud.
    Bitbucket,
    /// Bitbucket Data Center / Server.
    BitbucketServer,
}

impl Provider {
    const ALL: [Provider; 6] = [
        Provider::Github,
        Provider::Gitea,
        Provider::Forgejo,
        Provider::Gitlab,
        Provider::Bitbucket,
        Provider::BitbucketServer,
    ];

    /// The config word.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitea => "gitea",
            Provider::Forgejo => "forgejo",
            Provider::Gitlab => "gitlab",
            Provider::Bitbucket => "bitbucket",
            Provider::BitbucketServer => "bitbucket-server",
        }
    }

    fn default_api_url(self) -> Option<&'static str> {
        match self {
            Provider::Github => Some("https://api.github.com"),
            Provider::Gitlab => Some("https://gitlab.com"),
            Provider::Bitbucket => Some("https://api.bitbucket.org"),
            _ => None,
        }
    }
}

/// A validated `[projects.P.status]`.
#[derive(Debug, Clone)]
pub struct StatusConfig {
    /// Which host's API.
    pub provider: Provider,
    /// owner/name (GitLab: id or group/name; Bitbucket: workspace/slug).
    pub repo: String,
    /// The API token, from `token_file`.
    pub token: FileSecret,
    /// Where the token came from (for `check`).
    pub token_file: PathBuf,
    /// API base, without a trailing slash.
    pub api_url: String,
    /// GitHub/Gitea/Forgejo context, GitLab name, Bitbucket key.
    pub context: String,
}

// ---- raw mirror -----------------------------------------------------------------------------

/// `[notify.NAME]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSink {
    url: Option<Spanned<String>>,
    url_file: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
    secret_file: Option<Spanned<String>>,
    events: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[projects.P.status]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStatus {
    provider: Spanned<String>,
    repo: Spanned<String>,
    token_file: Spanned<String>,
    api_url: Option<Spanned<String>>,
    context: Option<Spanned<String>>,
}

// ---- validation -----------------------------------------------------------------------------

/// Sink names follow project names' rules: they appear in metric labels and URLs of the CLI.
fn valid_sink_name(s: &str) -> bool {
    super::ProjectName::parse(s).is_ok()
}

/// An http(s) URL with a host, or why not.
fn check_url(s: &str) -> Result<(), String> {
    let u: http::Uri = s.parse().map_err(|_| "is not a valid URL".to_owned())?;
    match u.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must be an http:// or https:// URL".into()),
    }
    if u.host().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    Ok(())
}

fn read_secret_file(
    ctx: &Ctx<'_>,
    base: &Path,
    key: &str,
    what: &str,
    f: &Spanned<String>,
) -> Result<(PathBuf, String), ConfigError> {
    let path = resolve(base, f.get_ref());
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ctx.err(
            span_of(f),
            key,
            format!("cannot read the {what} from {}: {e}", path.display()),
        )
    })?;
    let value = text.trim().to_owned();
    if value.is_empty() {
        return Err(ctx.err(
            span_of(f),
            key,
            format!("the {what} file {} is empty", path.display()),
        ));
    }
    Ok((path, value))
}

/// Validates every `[notify.NAME]`.
pub(super) fn validate_sinks(
    ctx: &Ctx<'_>,
    base: &Path,
    raw: BTreeMap<Spanned<String>, RawSink>,
) -> Result<BTreeMap<String, SinkConfig>, ConfigError> {
    let mut out = BTreeMap::new();
    for (name, s) in raw {
        let key = format!("notify.{}", name.get_ref());
        if !valid_sink_name(name.get_ref()) {
            return Err(ctx.err(
                span_of(&name),
                &key,
                "invalid sink name: use a-z, 0-9, '_' and '-', starting with a letter or digit, at most 63 characters",
            ));
        }
        let url = match (&s.url, &s.url_file) {
            (Some(u), None) => {
                check_url(u.get_ref().trim())
                    .map_err(|m| ctx.err(span_of(u), format!("{key}.url"), m))?;
                u.get_ref().trim().to_owned()
            }
            (None, Some(f)) => {
                let fkey = format!("{key}.url_file");
                let (path, url) = read_secret_file(ctx, base, &fkey, "sink URL", f)?;
                check_url(&url).map_err(|m| {
                    ctx.err(
                        span_of(f),
                        &fkey,
                        format!("the URL in {} {m}", path.display()),
                    )
                })?;
                url
            }
            (Some(u), Some(_)) => {
                return Err(ctx.err(span_of(u), &key, "set either url or url_file, not both"));
            }
            (None, None) => {
                return Err(ctx.err(
                    span_of(&name),
                    format!("{key}.url"),
                    "is required (or url_file)",
                ));
            }
        };
        let format = match &s.format {
            None => SinkFormat::Json,
            Some(f) => match f.get_ref().as_str() {
                "json" => SinkFormat::Json,
                "slack" => SinkFormat::Slack,
                "discord" => SinkFormat::Discord,
                other => {
                    return Err(ctx.err(
                        span_of(f),
                        format!("{key}.format"),
                        format!("unknown format {other:?}: use json, slack or discord"),
                    ));
                }
            },
        };
        let secret = match &s.secret_file {
            None => None,
            Some(f) => {
                let skey = format!("{key}.secret_file");
                if format != SinkFormat::Json {
                    return Err(ctx.err(
                        span_of(f),
                        &skey,
                        "only json sinks are signed (Slack and Discord URLs carry their own secret)",
                    ));
                }
                let (path, text) = read_secret_file(ctx, base, &skey, "signing secret", f)?;
                let key_bytes = text
                    .strip_prefix("whsec_")
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| {
                        ctx.err(
                            span_of(f),
                            &skey,
                            format!(
                                "{} does not hold a Standard Webhooks secret (whsec_ followed by base64)",
                                path.display()
                            ),
                        )
                    })?;
                Some(FileSecret(key_bytes))
            }
        };
        let events = match &s.events {
            None => [
                Event::Failed,
                Event::TimedOut,
                Event::Interrupted,
                Event::Recovered,
            ]
            .into_iter()
            .collect(),
            Some(list) => {
                let mut set = BTreeSet::new();
                for e in list.get_ref() {
                    let ev = Event::parse(e.get_ref()).ok_or_else(|| {
                        ctx.err(
                            span_of(e),
                            format!("{key}.events"),
                            format!(
                                "unknown event {:?}: use {}",
                                e.get_ref(),
                                Event::CONFIGURABLE.map(Event::as_str).join(", ")
                            ),
                        )
                    })?;
                    set.insert(ev);
                }
                set
            }
        };
        out.insert(
            name.get_ref().clone(),
            SinkConfig {
                name: name.get_ref().clone(),
                url: SinkUrl(url),
                format,
                secret,
                events,
            },
        );
    }
    Ok(out)
}

/// Validates a project's `notify` list against the sinks.
pub(super) fn validate_notify(
    ctx: &Ctx<'_>,
    key: &str,
    raw: Option<&Spanned<Vec<Spanned<String>>>>,
    sinks: &BTreeMap<String, SinkConfig>,
) -> Result<Option<Vec<String>>, ConfigError> {
    let Some(list) = raw else { return Ok(None) };
    let mut out = Vec::new();
    for n in list.get_ref() {
        if !sinks.contains_key(n.get_ref()) {
            return Err(ctx.err(
                span_of(n),
                format!("{key}.notify"),
                format!("no sink [notify.{}] is configured", n.get_ref()),
            ));
        }
        if !out.contains(n.get_ref()) {
            out.push(n.get_ref().clone());
        }
    }
    Ok(Some(out))
}

/// Validates a project's `[projects.P.status]`.
pub(super) fn validate_status(
    ctx: &Ctx<'_>,
    base: &Path,
    key: &str,
    raw: Option<&RawStatus>,
) -> Result<Option<StatusConfig>, ConfigError> {
    let Some(s) = raw else { return Ok(None) };
    let key = format!("{key}.status");
    let provider = Provider::ALL
        .into_iter()
        .find(|p| p.as_str() == s.provider.get_ref())
        .ok_or_else(|| {
            ctx.err(
                span_of(&s.provider),
                format!("{key}.provider"),
                format!(
                    "unknown provider {:?}: use {}",
                    s.provider.get_ref(),
                    Provider::ALL.map(Provider::as_str).join(", ")
                ),
            )
        })?;
    let repo = s.repo.get_ref().trim().trim_matches('/').to_owned();
    if repo.is_empty() || repo.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ctx.err(
            span_of(&s.repo),
            format!("{key}.repo"),
            "must be owner/name (GitLab: a numeric id or group/name)",
        ));
    }
    if provider != Provider::Gitlab && !repo.contains('/') {
        return Err(ctx.err(
            span_of(&s.repo),
            format!("{key}.repo"),
            format!("must be owner/name for {}", provider.as_str()),
        ));
    }
    let (token_file, token) = read_secret_file(
        ctx,
        base,
        &format!("{key}.token_file"),
        "status token",
        &s.token_file,
    )?;
    let api_url = match (&s.api_url, provider.default_api_url()) {
        (Some(u), _) => {
            let v = u.get_ref().trim().trim_end_matches('/').to_owned();
            check_url(&v).map_err(|m| ctx.err(span_of(u), format!("{key}.api_url"), m))?;
            v
        }
        (None, Some(d)) => d.to_owned(),
        (None, None) => {
            return Err(ctx.err(
                span_of(&s.provider),
                format!("{key}.api_url"),
                format!(
                    "is required for {} (the address of your server, like \"https://git.example.com\")",
                    provider.as_str()
                ),
            ));
        }
    };
    let context = match &s.context {
        None => "deployhook".to_owned(),
        Some(c) => {
            let v = c.get_ref().trim();
            if v.is_empty() || v.len() > 255 || v.chars().any(char::is_control) {
                return Err(ctx.err(
                    span_of(c),
                    format!("{key}.context"),
                    "must be 1 to 255 printable characters",
                ));
            }
            v.to_owned()
        }
    };
    Ok(Some(StatusConfig {
        provider,
        repo,
        token: FileSecret(token.into_bytes()),
        token_file,
        api_url,
        context,
    }))
}

/// The `check` lines of the sinks: name, format, redacted URL, events, and who they hear.
pub(super) fn summary(c: &super::Config) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "sinks       {}", c.sinks.len());
    for s in c.sinks.values() {
        let projects: Vec<&str> = c
            .projects
            .values()
            .filter(|p| p.notify.as_ref().is_none_or(|n| n.contains(&s.name)))
            .map(|p| p.name.as_str())
            .collect();
        let format = match s.format {
            SinkFormat::Json if s.secret.is_some() => "json (signed)",
            SinkFormat::Json => "json",
            SinkFormat::Slack => "slack",
            SinkFormat::Discord => "discord",
        };
        let _ = writeln!(
            out,
            "  {:<20} {format} to {}, events [{}], projects [{}]",
            s.name,
            s.url.redacted(),
            s.events
                .iter()
                .map(|e| e.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            projects.join(", ")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use std::path::Path;

    fn parse(dir: &Path, text: &str) -> Result<Config, String> {
        let text = format!(
            "[projects.site]\nbranches = [\"main\"]\nworkdir = \"/tmp\"\ncommand = \"true\"\n{text}"
        );
        Config::parse(&text, &dir.join("deploy.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn sinks_and_statuses_validate_with_positions() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(
            d.join("ok.whsec"),
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
        )
        .unwrap();
        std::fs::write(d.join("bad.whsec"), "not-a-secret\n").unwrap();
        std::fs::write(d.join("t.token"), "tok\n").unwrap();
        std::fs::write(
            d.join("ops.url"),
            "https://hooks.slack.com/services/T/B/SECRET\n",
        )
        .unwrap();
        let c = parse(
            d,
            "notify = [\"ops\"]\n[notify.ops]\nurl_file = \"ops.url\"\nformat = \"slack\"\n",
        )
        .unwrap();
        let s = &c.sinks["ops"];
        assert_eq!(s.url.redacted(), "https://hooks.slack.com");
        assert!(!format!("{s:?}").contains("SECRET"));
        assert_eq!(s.events.len(), 4, "the default events");
        for (text, want) in [
            (
                "[notify.x]\nformat = \"json\"\n",
                "notify.x.url: is required",
            ),
            (
                "[notify.x]\nurl = \"ftp://h\"\n",
                "notify.x.url: must be an http:// or https:// URL",
            ),
            (
                "[notify.x]\nurl = \"http://h\"\nformat = \"teams\"\n",
                "notify.x.format: unknown format",
            ),
            (
                "[notify.x]\nurl = \"http://h\"\nevents = [\"exploded\"]\n",
                "notify.x.events: unknown event",
            ),
            (
                "[notify.x]\nurl = \"http://h\"\nsecret_file = \"bad.whsec\"\n",
                "notify.x.secret_file:",
            ),
            (
                "[notify.x]\nurl = \"http://h\"\nformat = \"slack\"\nsecret_file = \"ok.whsec\"\n",
                "only json sinks are signed",
            ),
            (
                "[notify.x]\nurl = \"http://h\"\nbogus = 1\n",
                "unknown field",
            ),
            (
                "notify = [\"nope\"]\n",
                "projects.site.notify: no sink [notify.nope]",
            ),
            (
                "[projects.site.status]\nprovider = \"svn\"\nrepo = \"a/b\"\ntoken_file = \"t.token\"\n",
                "projects.site.status.provider: unknown provider",
            ),
            (
                "[projects.site.status]\nprovider = \"gitea\"\nrepo = \"a/b\"\ntoken_file = \"t.token\"\n",
                "projects.site.status.api_url: is required for gitea",
            ),
            (
                "[projects.site.status]\nprovider = \"github\"\nrepo = \"a/b\"\ntoken_file = \"missing.token\"\n",
                "projects.site.status.token_file: cannot read",
            ),
            (
                "[projects.site.status]\nprovider = \"github\"\nrepo = \"a/b\"\n",
                "token_file",
            ),
        ] {
            let err = parse(d, text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.contains("deploy.toml:"), "{err}");
        }
        let c = parse(d, "[projects.site.status]\nprovider = \"gitlab\"\nrepo = \"group/site\"\ntoken_file = \"t.token\"\n").unwrap();
        let st = c.projects.values().next().unwrap().status.as_ref().unwrap();
        assert_eq!(st.api_url, "https://gitlab.com");
        assert_eq!(st.context, "deployhook");
        assert!(!format!("{st:?}").contains("tok\""));
    }
}
