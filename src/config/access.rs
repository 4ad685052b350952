//! The config keys of who may trigger what, and when (SPEC §2.2, §2.3, §3 (v2)):
//! `[server] trusted_proxies`, `[api.tokens.NAME]`, and the project keys `quiet_period`,
//! `max_quiet_period`, `params`, `allow_from` and `[[projects.P.schedule]]`. Raw mirrors and
//! their validation, kept apart from the rest of the config so that each concern reads on
//! its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Ctx, ProjectName, RefPattern, any_matches, duration, resolve, span_of};
use crate::access::Scope;
use crate::machine::Quiet;
use crate::schedule::Schedule;

/// Longest `quiet_period` or `max_quiet_period`: a build waiting longer than a day for more
/// triggers is a mistake, not a setting.
pub const MAX_QUIET: Duration = Duration::from_secs(24 * 3600);

/// Most `params` a project may list.
pub const MAX_PARAMS: usize = 32;

/// `[api.tokens.NAME]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApiToken {
    token_file: Spanned<String>,
    scope: Option<Spanned<String>>,
    projects: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[[projects.P.schedule]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchedule {
    cron: Spanned<String>,
    branch: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
}

/// The project keys of this module, as written.
#[derive(Default)]
pub(super) struct RawProjectAccess<'a> {
    pub quiet_period: Option<&'a Spanned<String>>,
    pub max_quiet_period: Option<&'a Spanned<String>>,
    pub params: Option<&'a Spanned<Vec<Spanned<String>>>>,
    pub allow_from: Option<&'a Spanned<Vec<Spanned<String>>>>,
    pub schedule: &'a [RawSchedule],
}

/// One validated `[api.tokens.NAME]`.
#[derive(Debug, Clone)]
pub struct ApiTokenConfig {
    /// The file holding the token (generated when missing).
    pub token_file: PathBuf,
    /// What it may do.
    pub scope: Scope,
    /// The projects it may reach; `None`: all.
    pub projects: Option<BTreeSet<String>>,
}

/// The validated project keys of this module.
#[derive(Debug, Clone, Default)]
pub struct ProjectAccess {
    /// `quiet_period` and `max_quiet_period` (SPEC §2.2).
    pub quiet: Quiet,
    /// `params`: the parameter names a trigger may pass (SPEC §2.3).
    pub params: BTreeSet<String>,
    /// `allow_from`: where hooks and Git deliveries may come from; `None`: anywhere.
    pub allow_from: Option<Vec<IpNet>>,
    /// `[[projects.P.schedule]]`.
    pub schedules: Vec<Schedule>,
}

/// Parses one CIDR (`192.0.2.0/24`) or a bare address (a /32 or /128).
fn cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!(
                "{:?} is not a CIDR range or an IP address (write it like \"192.0.2.0/24\" or \"2001:db8::/32\")",
                crate::model::clip(s, 80)
            )
        })
}

fn cidrs(
    ctx: &Ctx<'_>,
    key: &str,
    v: &Spanned<Vec<Spanned<String>>>,
) -> Result<Vec<IpNet>, ConfigError> {
    v.get_ref()
        .iter()
        .map(|s| cidr(s.get_ref()).map_err(|m| ctx.err(span_of(s), key, m)))
        .collect()
}

/// `[server] trusted_proxies`.
pub(super) fn trusted_proxies(
    ctx: &Ctx<'_>,
    v: Option<&Spanned<Vec<Spanned<String>>>>,
) -> Result<Vec<IpNet>, ConfigError> {
    match v {
        None => Ok(Vec::new()),
        Some(v) => cidrs(ctx, "server.trusted_proxies", v),
    }
}

/// Whether `s` is a valid parameter name: `^[a-z][a-z0-9_]{0,31}$`.
pub fn valid_param_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// The project keys of this module, for project `name` (its `branches` already validated).
pub(super) fn project_access(
    ctx: &Ctx<'_>,
    key: &str,
    branches: &[RefPattern],
    raw: RawProjectAccess<'_>,
) -> Result<ProjectAccess, ConfigError> {
    let qkey = format!("{key}.quiet_period");
    let period = duration(ctx, &qkey, raw.quiet_period, Duration::ZERO, true)?;
    if period > MAX_QUIET {
        return Err(ctx.err(
            raw.quiet_period.and_then(span_of),
            &qkey,
            "must be at most 24h",
        ));
    }
    let mkey = format!("{key}.max_quiet_period");
    let max = duration(ctx, &mkey, raw.max_quiet_period, period * 10, true)?;
    if let Some(v) = raw.max_quiet_period {
        if max < period {
            return Err(ctx.err(
                span_of(v),
                &mkey,
                format!(
                    "must be at least quiet_period ({})",
                    humantime::format_duration(period)
                ),
            ));
        }
        if max > MAX_QUIET * 10 {
            return Err(ctx.err(span_of(v), &mkey, "must be at most 240h"));
        }
    }

    let pkey = format!("{key}.params");
    let mut params = BTreeSet::new();
    if let Some(list) = raw.params {
        if list.get_ref().len() > MAX_PARAMS {
            return Err(ctx.err(span_of(list), &pkey, format!("at most {MAX_PARAMS} names")));
        }
        for n in list.get_ref() {
            if !valid_param_name(n.get_ref()) {
                return Err(ctx.err(
                    span_of(n),
                    &pkey,
                    format!(
                        "invalid parameter name {:?}: use 1 to 32 characters of a-z, 0-9 and '_', starting with a letter",
                        crate::model::clip(n.get_ref(), 40)
                    ),
                ));
            }
            if !params.insert(n.get_ref().clone()) {
                return Err(ctx.err(
                    span_of(n),
                    &pkey,
                    format!("{:?} is listed twice", n.get_ref()),
                ));
            }
        }
    }

    let allow_from = match raw.allow_from {
        None => None,
        Some(v) => Some(cidrs(ctx, &format!("{key}.allow_from"), v)?),
    };

    let skey = format!("{key}.schedule");
    let mut schedules = Vec::new();
    for s in raw.schedule {
        let branch = match &s.branch {
            Some(b) => {
                if !any_matches(branches, b.get_ref()) {
                    return Err(ctx.err_about(
                        b,
                        format!("{skey}.branch"),
                        "is not a branch name the project's branches match",
                    ));
                }
                b.get_ref().clone()
            }
            None => match branches.first() {
                Some(b) if !b.is_glob() => b.as_str().to_owned(),
                _ => {
                    return Err(ctx.err(
                        span_of(&s.cron),
                        format!("{skey}.branch"),
                        "is required: the project's first branch is a glob, not one branch",
                    ));
                }
            },
        };
        let tz = s.timezone.as_ref().map_or("UTC", |t| t.get_ref().as_str());
        let schedule = Schedule::new(s.cron.get_ref(), tz, &branch).map_err(|m| {
            let (span, k) = if m.contains("time zone") {
                (s.timezone.as_ref().and_then(span_of), "timezone")
            } else {
                (span_of(&s.cron), "cron")
            };
            ctx.err(span, format!("{skey}.{k}"), m)
        })?;
        schedules.push(schedule);
    }

    Ok(ProjectAccess {
        quiet: Quiet { period, max },
        params,
        allow_from,
        schedules,
    })
}

/// `[api.tokens.*]`, checked against the projects of the config and the admin token file.
pub(super) fn api_tokens(
    ctx: &Ctx<'_>,
    base: &Path,
    raw: &BTreeMap<Spanned<String>, RawApiToken>,
    admin_file: &Path,
    projects: &BTreeSet<String>,
) -> Result<BTreeMap<String, ApiTokenConfig>, ConfigError> {
    let mut out = BTreeMap::new();
    let mut files: BTreeMap<PathBuf, String> = BTreeMap::new();
    files.insert(admin_file.to_path_buf(), "api.token_file".into());
    for (name, t) in raw {
        let key = format!("api.tokens.{}", name.get_ref());
        ProjectName::parse(name.get_ref()).map_err(|_| {
            ctx.err(
                span_of(name),
                &key,
                "invalid token name: use 1 to 63 characters of a-z, 0-9, '_' and '-', starting with a letter or digit",
            )
        })?;
        let fkey = format!("{key}.token_file");
        if t.token_file.get_ref().trim().is_empty() {
            return Err(ctx.err(span_of(&t.token_file), &fkey, "must not be empty"));
        }
        let file = resolve(base, t.token_file.get_ref());
        if let Some(other) = files.insert(file.clone(), key.clone()) {
            return Err(ctx.err(
                span_of(&t.token_file),
                &fkey,
                format!(
                    "{} is already the token file of {other}: each token needs its own",
                    file.display()
                ),
            ));
        }
        let scope = match &t.scope {
            None => Scope::Read,
            Some(s) => Scope::parse(s.get_ref()).ok_or_else(|| {
                ctx.err(
                    span_of(s),
                    format!("{key}.scope"),
                    format!(
                        "unknown scope {:?}: use \"read\", \"trigger\" or \"admin\"",
                        crate::model::clip(s.get_ref(), 40)
                    ),
                )
            })?,
        };
        let token_projects = match &t.projects {
            None => None,
            Some(list) => {
                let mut set = BTreeSet::new();
                for p in list.get_ref() {
                    if !projects.contains(p.get_ref()) {
                        return Err(ctx.err_about(
                            p,
                            format!("{key}.projects"),
                            "is not a configured project",
                        ));
                    }
                    set.insert(p.get_ref().clone());
                }
                Some(set)
            }
        };
        out.insert(
            name.get_ref().clone(),
            ApiTokenConfig {
                token_file: file,
                scope,
                projects: token_projects,
            },
        );
    }
    Ok(out)
}

/// `deployhook check` lines about a project's keys of this module: quiet period, params,
/// `allow_from`, and each schedule with its next run.
pub(super) fn summarize(out: &mut String, p: &super::ProjectConfig) {
    use std::fmt::Write as _;
    let a = &p.access;
    if !a.quiet.period.is_zero() {
        let _ = writeln!(
            out,
            "  {:<20} quiet period {} (at most {})",
            "",
            humantime::format_duration(a.quiet.period),
            humantime::format_duration(a.quiet.max)
        );
    }
    if !a.params.is_empty() {
        let names: Vec<&str> = a.params.iter().map(String::as_str).collect();
        let _ = writeln!(out, "  {:<20} params [{}]", "", names.join(", "));
    }
    if let Some(nets) = &a.allow_from {
        let nets: Vec<String> = nets.iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "  {:<20} allow_from [{}]", "", nets.join(", "));
    }
    let now = crate::model::Timestamp::now();
    for s in &a.schedules {
        let _ = writeln!(
            out,
            "  {:<20} schedule {:?} {} branch {}: next run {}",
            "",
            s.cron_text,
            s.timezone,
            s.branch,
            s.describe_next(now)
        );
    }
}

/// `deployhook check` lines about `[server] trusted_proxies` and `[api.tokens.*]`.
pub(super) fn summarize_api(out: &mut String, c: &super::Config) {
    use std::fmt::Write as _;
    if !c.server.trusted_proxies.is_empty() {
        let nets: Vec<String> = c
            .server
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        let _ = writeln!(out, "proxies     [{}]", nets.join(", "));
    }
    for (name, t) in &c.api.tokens {
        let projects = t.projects.as_ref().map_or("all projects".to_owned(), |ps| {
            ps.iter().cloned().collect::<Vec<_>>().join(", ")
        });
        let _ = writeln!(
            out,
            "token       {name}: scope {}, {projects}, {}",
            t.scope.as_str(),
            t.token_file.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;
    use crate::access::Scope;
    use std::path::Path;
    use std::time::Duration;

    /// Config's `MINIMAL` project with a second branch, `dev`, for schedules to name.
    const SITE: &str =
        "[projects.site]\nbranches = [\"main\", \"dev\"]\ncommand = \"true\"\nworkdir = \"/tmp\"\n";

    /// Each case `(extra, key, line)`: the config `text(extra)` fails to parse, naming `key`
    /// and `line`, and the message leads with the file.
    #[track_caller]
    fn assert_each_fails_at(cases: &[(&str, &str, usize)], text: impl Fn(&str) -> String) {
        for (extra, key, line) in cases {
            let e = parse(&text(extra)).unwrap_err();
            assert_eq!(&e.key, key, "{extra}: {e}");
            assert_eq!(e.position.map(|p| p.0), Some(*line), "{extra}: {e}");
            assert!(e.to_string().starts_with("/tmp/deploy.toml:"), "{e}");
        }
    }

    #[test]
    fn defaults_are_off() {
        let c = parse(SITE).unwrap();
        let p = c.project("site").unwrap();
        assert_eq!(p.access.quiet.period, Duration::ZERO);
        assert!(p.access.params.is_empty());
        assert!(p.access.allow_from.is_none());
        assert!(p.access.schedules.is_empty());
        assert!(c.server.trusted_proxies.is_empty());
        assert!(c.api.tokens.is_empty());
    }

    #[test]
    fn every_key_is_read() {
        let c = parse(&format!(
            "[server]\ntrusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\"]\n\
             [api]\n[api.tokens.ci]\ntoken_file = \"ci.token\"\nscope = \"trigger\"\nprojects = [\"site\"]\n\
             [api.tokens.dash]\ntoken_file = \"dash.token\"\n\
             {SITE}quiet_period = \"30s\"\nparams = [\"env\", \"zone_2\"]\nallow_from = [\"192.0.2.0/24\"]\n\
             [[projects.site.schedule]]\ncron = \"0 3 * * *\"\ntimezone = \"Europe/Berlin\"\n\
             [[projects.site.schedule]]\ncron = \"*/5 * * * *\"\nbranch = \"dev\"\n"
        ))
        .unwrap();
        assert_eq!(c.server.trusted_proxies.len(), 2);
        assert_eq!(c.server.trusted_proxies[1].to_string(), "127.0.0.1/32");
        let ci = &c.api.tokens["ci"];
        assert_eq!(ci.scope, Scope::Trigger);
        assert_eq!(ci.token_file, Path::new("/tmp/ci.token"));
        assert_eq!(ci.projects.as_ref().unwrap().len(), 1);
        let dash = &c.api.tokens["dash"];
        assert_eq!(dash.scope, Scope::Read);
        assert!(dash.projects.is_none());
        let p = &c.project("site").unwrap().access;
        assert_eq!(p.quiet.period, Duration::from_secs(30));
        assert_eq!(
            p.quiet.max,
            Duration::from_secs(300),
            "default 10 x quiet_period"
        );
        assert_eq!(
            p.params.iter().cloned().collect::<Vec<_>>(),
            ["env", "zone_2"]
        );
        assert_eq!(p.allow_from.as_ref().unwrap().len(), 1);
        assert_eq!(p.schedules.len(), 2);
        assert_eq!(p.schedules[0].branch, "main");
        assert_eq!(p.schedules[0].timezone, "Europe/Berlin");
        assert_eq!(p.schedules[1].branch, "dev");
        assert_eq!(p.schedules[1].timezone, "UTC");
        let summary = c.summary();
        assert!(
            summary.contains("schedule \"0 3 * * *\" Europe/Berlin"),
            "{summary}"
        );
    }

    #[test]
    fn bad_values_name_their_line_and_key() {
        let cases: &[(&str, &str, usize)] = &[
            ("quiet_period = \"soon\"\n", "projects.site.quiet_period", 5),
            ("quiet_period = \"25h\"\n", "projects.site.quiet_period", 5),
            (
                "quiet_period = \"1m\"\nmax_quiet_period = \"30s\"\n",
                "projects.site.max_quiet_period",
                6,
            ),
            ("params = [\"Env\"]\n", "projects.site.params", 5),
            ("params = [\"env\", \"env\"]\n", "projects.site.params", 5),
            (
                "allow_from = [\"192.0.2.0/33\"]\n",
                "projects.site.allow_from",
                5,
            ),
            (
                "allow_from = [\"everyone\"]\n",
                "projects.site.allow_from",
                5,
            ),
            (
                "[[projects.site.schedule]]\ncron = \"0 3 * * * *\"\n",
                "projects.site.schedule.cron",
                6,
            ),
            (
                "[[projects.site.schedule]]\ncron = \"0 3 * *\"\n",
                "projects.site.schedule.cron",
                6,
            ),
            (
                "[[projects.site.schedule]]\ncron = \"0 3 * * *\"\ntimezone = \"Nowhere/City\"\n",
                "projects.site.schedule.timezone",
                7,
            ),
            (
                "[[projects.site.schedule]]\ncron = \"0 3 * * *\"\nbranch = \"prod\"\n",
                "projects.site.schedule.branch",
                7,
            ),
            (
                "[[projects.site.schedule]]\ncron = \"0 3 * * *\"\nwhen = \"x\"\n",
                "projects.site.schedule.when",
                7,
            ),
            (
                "[[projects.site.schedule]]\ncron = \"0 3 * * *\"\nbranch = \"rel/*\"\n",
                "projects.site.schedule.branch",
                7,
            ),
        ];
        assert_each_fails_at(cases, |extra| format!("{SITE}{extra}"));
        let e = parse(&format!("[server]\ntrusted_proxies = [\"proxy\"]\n{SITE}")).unwrap_err();
        assert_eq!(e.key, "server.trusted_proxies", "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
    }

    #[test]
    fn a_schedule_of_a_glob_project_names_a_concrete_matching_branch() {
        let globbed =
            "[projects.site]\nbranches = [\"release/*\"]\ncommand = \"true\"\nworkdir = \"/tmp\"\n";
        let e = parse(&format!(
            "{globbed}[[projects.site.schedule]]\ncron = \"0 3 * * *\"\n"
        ))
        .unwrap_err();
        assert_eq!(e.key, "projects.site.schedule.branch", "{e}");
        let c = parse(&format!(
            "{globbed}[[projects.site.schedule]]\ncron = \"0 3 * * *\"\nbranch = \"release/2\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.project("site").unwrap().access.schedules[0].branch,
            "release/2"
        );
    }

    #[test]
    fn bad_tokens_name_their_line_and_key() {
        let cases: &[(&str, &str, usize)] = &[
            (
                "[api.tokens.ci]\nscope = \"read\"\n",
                "api.tokens.ci.token_file",
                2,
            ),
            (
                "[api.tokens.ci]\ntoken_file = \"ci\"\nscope = \"write\"\n",
                "api.tokens.ci.scope",
                4,
            ),
            (
                "[api.tokens.ci]\ntoken_file = \"ci\"\nprojects = [\"blog\"]\n",
                "api.tokens.ci.projects",
                4,
            ),
            (
                "[api.tokens.ci]\ntoken_file = \"admin.token\"\n",
                "api.tokens.ci.token_file",
                3,
            ),
            (
                "[api.tokens.ci]\ntoken_file = \"ci\"\nexpires = 3\n",
                "api.tokens.ci.expires",
                4,
            ),
        ];
        assert_each_fails_at(cases, |extra| format!("[api]\n{extra}{SITE}"));
    }
}
