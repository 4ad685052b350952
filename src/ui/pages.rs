//! The page templates (maud: checked at compile time, every `(expr)` HTML-escaped).
//!
//! Pure functions from what a page shows to markup; `ui::mod` gathers the data and sends the
//! result. Nothing here reads the store or the clock: `now` comes in, so pages render the
//! same in tests.

use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::text::{self, Segment};
use crate::model::{Build, BuildId, Hook, Phase, Timestamp};

/// What every page's header needs.
pub struct Chrome<'a> {
    /// Path of the stylesheet (content-hashed).
    pub css: &'a str,
    /// Path of the script (content-hashed).
    pub js: &'a str,
    /// The signed-in session: its scope word and CSRF token (for the logout form).
    pub signed: Option<(&'a str, &'a str)>,
}

/// The page frame.
pub fn layout(chrome: &Chrome<'_>, title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · deployhook" }
                link rel="stylesheet" href=(chrome.css);
                script src=(chrome.js) defer {}
            }
            body {
                header.top {
                    a.brand href="/ui/" { "deployhook" }
                    @match chrome.signed {
                        Some((scope, csrf)) => {
                            span.who { "signed in (" (scope) ")" }
                            form method="post" action="/ui/logout" {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                        None => { a href="/ui/login" { "Sign in" } }
                    }
                }
                main { (content) }
            }
        }
    }
}

/// A small icon for a status: the word beside it carries the meaning, the icon repeats it
/// for the eye, and neither relies on colour.
fn icon(kind: &str) -> Markup {
    let body = match kind {
        "success" => r#"<circle cx="8" cy="8" r="7"/><path d="M4.5 8.2l2.3 2.3 4.7-5"/>"#,
        "fail" => r#"<circle cx="8" cy="8" r="7"/><path d="M5.2 5.2l5.6 5.6M10.8 5.2l-5.6 5.6"/>"#,
        "cancelled" => r#"<circle cx="8" cy="8" r="7"/><path d="M3.1 12.9l9.8-9.8"/>"#,
        "timed_out" => r#"<circle cx="8" cy="8" r="7"/><path d="M8 4v4.3l2.8 1.8"/>"#,
        "interrupted" => r#"<path d="M8 1.5l7 12.5H1z"/><path d="M8 6v4M8 11.6v.6"/>"#,
        "running" => r#"<circle cx="8" cy="8" r="7"/><path d="M6.3 5v6l4.7-3z"/>"#,
        "initializing" => {
            r#"<circle cx="8" cy="8" r="7" stroke-dasharray="2.5 2"/><circle cx="8" cy="8" r="1.2"/>"#
        }
        "queued" => r#"<circle cx="8" cy="8" r="7"/><path d="M5 8h.1M8 8h.1M11 8h.1"/>"#,
        _ => r#"<circle cx="8" cy="8" r="7" stroke-dasharray="1.5 2"/>"#,
    };
    html! {
        svg.icon width="16" height="16" viewBox="0 0 16 16" fill="none" stroke="currentColor"
            stroke-width="1.7" stroke-linecap="round" stroke-linejoin="round" aria-hidden="true" {
            // Constant markup from the match above; nothing user-supplied.
            (PreEscaped(body))
        }
    }
}

/// The status word of a phase: the outcome once stopped, else the status.
pub fn status_word(phase: Phase) -> &'static str {
    match phase {
        Phase::Stopped(o) => o.as_str(),
        p => p.status(),
    }
}

fn status_label(word: &str) -> &'static str {
    match word {
        "success" => "success",
        "fail" => "failed",
        "cancelled" => "cancelled",
        "timed_out" => "timed out",
        "interrupted" => "interrupted",
        "running" => "running",
        "initializing" => "initializing",
        "queued" => "queued",
        _ => "no builds yet",
    }
}

/// A build's status: icon and word.
pub fn status(phase: Option<Phase>) -> Markup {
    let word = phase.map_or("none", status_word);
    html! {
        span class={ "status s-" (word) } data-status=(word) {
            (icon(word)) span.word { (status_label(word)) }
        }
    }
}

/// A time, relative to `now`, with the exact RFC 3339 time on hover.
pub fn time(t: Timestamp, now: Timestamp) -> Markup {
    let exact = t.rfc3339();
    html! { time datetime=(exact) title=(exact) { (text::relative(t, now)) } }
}

fn opt_time(t: Option<Timestamp>, now: Timestamp) -> Markup {
    match t {
        Some(t) => time(t, now),
        None => html! { span.muted { "—" } },
    }
}

fn short(id: BuildId) -> String {
    id.to_string()[..8].to_owned()
}

fn build_link(id: BuildId) -> Markup {
    html! { a.mono href={ "/ui/builds/" (id) } { (short(id)) } }
}

fn trigger_text(b: &Build) -> Markup {
    html! {
        (b.trigger.source.label())
        @if let Some((_, name)) = &b.trigger.hook { " " q { (name) } }
    }
}

fn ref_text(b: &Build) -> Markup {
    html! {
        @if b.git_ref.tag().is_some() { "tag " }
        code { (b.git_ref.name()) }
    }
}

fn duration_of(b: &Build, now: Timestamp) -> Option<String> {
    let start = b.initializing_on?;
    Some(text::duration(text::between(
        start,
        b.stopped_on.unwrap_or(now),
    )))
}

/// One row of the projects page.
pub struct ProjectRow<'a> {
    /// Project name.
    pub name: &'a str,
    /// Its branches.
    pub branches: Vec<&'a str>,
    /// Queued builds.
    pub queued: usize,
    /// The build initializing or running.
    pub running: Option<BuildId>,
    /// The newest build.
    pub last: Option<Build>,
}

/// `/ui/`.
pub fn index(chrome: &Chrome<'_>, rows: &[ProjectRow<'_>], now: Timestamp) -> Markup {
    layout(
        chrome,
        "Projects",
        html! {
            h1 { "Projects" }
            @if rows.is_empty() {
                p.muted { "No projects to show." }
            } @else {
                table.projects {
                    thead { tr {
                        th { "Project" } th { "Last build" } th.opt { "Branches" }
                        th { "Queued" } th { "Running" }
                    } }
                    tbody {
                        @for r in rows {
                            tr {
                                td { a href={ "/ui/projects/" (r.name) } { strong { (r.name) } } }
                                td {
                                    @match &r.last {
                                        Some(b) => {
                                            (status(Some(b.phase))) " "
                                            (build_link(b.id)) br;
                                            span.muted { (ref_text(b)) " · " (time(b.created_on, now)) }
                                        }
                                        None => { (status(None)) }
                                    }
                                }
                                td.opt { @for (i, br) in r.branches.iter().enumerate() {
                                    @if i > 0 { ", " } code { (br) }
                                } }
                                td { (r.queued) }
                                td { @match r.running {
                                    Some(id) => { (build_link(id)) }
                                    None => { span.muted { "—" } }
                                } }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// What the project page shows.
pub struct ProjectPage<'a> {
    /// Project name.
    pub name: &'a str,
    /// Its `branches` entries, and whether each is a glob.
    pub branches: Vec<(&'a str, bool)>,
    /// Its hooks.
    pub hooks: Vec<Hook>,
    /// One page of builds, newest first.
    pub builds: Vec<Build>,
    /// The cursor of the next page, if there is one.
    pub next_cursor: Option<String>,
    /// The session's CSRF token when it may trigger builds of this project.
    pub act_csrf: Option<&'a str>,
    /// Whether nobody is signed in (public mode).
    pub anonymous: bool,
}

/// `/ui/projects/{p}`.
pub fn project(chrome: &Chrome<'_>, p: &ProjectPage<'_>, now: Timestamp) -> Markup {
    layout(
        chrome,
        p.name,
        html! {
            p.muted { a href="/ui/" { "Projects" } " / " }
            h1 { (p.name) }
            section.trigger {
                h2 { "Trigger a build" }
                @if let Some(csrf) = p.act_csrf {
                    div.actions {
                        @for (br, glob) in &p.branches {
                            form method="post" action={ "/ui/projects/" (p.name) "/trigger" } {
                                input type="hidden" name="csrf" value=(csrf);
                                @if *glob {
                                    // A glob names many branches: the user types one.
                                    input type="text" name="branch" placeholder=(br) required
                                        aria-label={ "A branch matching " (br) };
                                    " "
                                    button.primary type="submit" { "Build" }
                                } @else {
                                    input type="hidden" name="branch" value=(br);
                                    button.primary type="submit" { "Build " code { (br) } }
                                }
                            }
                        }
                    }
                } @else if p.anonymous {
                    p.muted { a href="/ui/login" { "Sign in" } " to trigger builds." }
                } @else {
                    p.muted { "Your token may read this project but not trigger its builds." }
                }
            }
            section {
                h2 { "Builds" }
                @if p.builds.is_empty() {
                    p.muted { "No builds yet." }
                } @else {
                    (builds_table(&p.builds, now))
                }
                @if let Some(c) = &p.next_cursor {
                    nav.pager { a href={ "/ui/projects/" (p.name) "?cursor=" (c) } { "Older builds →" } }
                }
            }
            section {
                h2 { "Deploy hooks" }
                @if p.hooks.is_empty() {
                    p.muted { "No hooks. Create one with " code { "deployhook hooks create" } "." }
                } @else {
                    table.hooks {
                        thead { tr {
                            th { "Name" } th { "Branch" } th { "Last triggered" } th { "Triggers" } th.opt { "Created" }
                        } }
                        tbody { @for h in &p.hooks { tr {
                            td { (h.name) } td { code { (h.branch) } }
                            td { (opt_time(h.last_triggered_on, now)) }
                            td { (h.trigger_count) }
                            td.opt { (time(h.created_on, now)) }
                        } } }
                    }
                }
            }
        },
    )
}

fn builds_table(builds: &[Build], now: Timestamp) -> Markup {
    html! {
        table.builds {
            thead { tr {
                th { "Status" } th { "Build" } th { "Ref" } th.opt { "Trigger" } th.opt { "Commit" }
                th { "Created" } th.opt { "Duration" }
            } }
            tbody { @for b in builds { tr {
                td { (status(Some(b.phase))) }
                td { (build_link(b.id)) }
                td { (ref_text(b)) }
                td.opt { (trigger_text(b)) }
                td.opt { @match &b.commit {
                    Some(c) => { code title=(c) { (c.get(..10).unwrap_or(c)) } }
                    None => { span.muted { "—" } }
                } }
                td { (time(b.created_on, now)) }
                td.opt { (duration_of(b, now).unwrap_or_default()) }
            } } }
        }
    }
}

/// The actions a build page may offer.
pub struct BuildActions<'a> {
    /// The session's CSRF token when it may act on this build's project.
    pub csrf: Option<&'a str>,
    /// Whether redeploying is offered.
    pub redeploy: bool,
}

/// The part of a build page that changes while it runs: status, facts and buttons. Sent
/// again whole over the live stream when the status changes.
pub fn summary(b: &Build, actions: &BuildActions<'_>, now: Timestamp) -> Markup {
    html! {
        section #summary data-status=(status_word(b.phase)) {
            p.big { (status(Some(b.phase))) }
            dl.facts {
                dt { "Project" } dd { a href={ "/ui/projects/" (b.project) } { (b.project) } }
                dt { "Ref" } dd { (ref_text(b)) }
                dt { "Trigger" } dd { (trigger_text(b)) }
                @if !b.params.is_empty() {
                    dt { "Parameters" } dd { @for (i, (k, v)) in b.params.iter().enumerate() {
                        @if i > 0 { ", " } code { (k) "=" (v) }
                    } }
                }
                dt { "Commit" } dd { @match &b.commit {
                    Some(c) => { code { (c) } }
                    None => { span.muted { "—" } }
                } }
                @if !b.requested_commits.is_empty() {
                    dt { "Requested commits" } dd { @for (i, c) in b.requested_commits.iter().enumerate() {
                        @if i > 0 { ", " } code title=(c) { (c.get(..10).unwrap_or(c)) }
                    } }
                }
                dt { "Created" } dd { (time(b.created_on, now)) }
                dt { "Started" } dd { (opt_time(b.initializing_on, now)) }
                dt { "Stopped" } dd { (opt_time(b.stopped_on, now)) }
                @if let Some(d) = duration_of(b, now) {
                    dt { "Duration" } dd { (d) }
                }
                @if let Some(code) = b.exit_code {
                    dt { "Exit code" } dd { (code) }
                }
                @if let Some(r) = b.cancel_reason {
                    dt { "Cancelled" } dd { @match b.superseded_by {
                        Some(by) => { "superseded by " (build_link(by)) }
                        None => { (r.as_str()) }
                    } }
                }
                @if let Some(of) = b.redeploy_of {
                    dt { "Redeploy of" } dd { (build_link(of)) }
                }
            }
            @if let Some(csrf) = actions.csrf {
                div.actions {
                    @if !b.phase.is_stopped() {
                        form method="post" action={ "/ui/builds/" (b.id) "/cancel" } {
                            input type="hidden" name="csrf" value=(csrf);
                            button.danger type="submit" { "Cancel build" }
                        }
                    }
                    @if actions.redeploy {
                        form method="post" action={ "/ui/builds/" (b.id) "/redeploy" } {
                            input type="hidden" name="csrf" value=(csrf);
                            button type="submit" { "Redeploy" }
                        }
                    }
                }
            }
        }
    }
}

/// One log line as stored (`buildlog`'s NDJSON).
#[derive(Debug, serde::Deserialize)]
pub struct LogLine {
    /// Line number, from 0.
    pub n: u64,
    /// When it was written.
    #[serde(default)]
    pub ts: String,
    /// Which stream (`stdout`, `stderr`, `system`).
    pub stream: String,
    /// The text.
    pub line: String,
}

/// One log line: its number (a link to itself) and its text, colours as classes.
pub fn log_line(l: &LogLine) -> Markup {
    let segs: Vec<Segment> = text::segments(&l.line);
    // Only the three known words become a class.
    let stream = match l.stream.as_str() {
        s @ ("stdout" | "stderr" | "system") => s,
        _ => "stdout",
    };
    html! {
        div class={ "ln " (stream) } id={ "L" (l.n + 1) } {
            a href={ "#L" (l.n + 1) } title=(l.ts) { (l.n + 1) }
            span { @for s in &segs {
                @let c = s.style.classes();
                @if c.is_empty() { (s.text) } @else { span class=(c) { (s.text) } }
            } }
        }
    }
}

/// What the build page shows.
pub struct BuildPage<'a> {
    /// The build.
    pub build: &'a Build,
    /// Its buttons.
    pub actions: BuildActions<'a>,
    /// The log lines shown (from `log_from`).
    pub lines: Vec<LogLine>,
    /// The first line shown.
    pub log_from: u64,
    /// Where the next part of the log starts, when this page does not reach the end.
    pub log_more: Option<u64>,
    /// The live stream's URL while the build can still write lines.
    pub follow: Option<String>,
    /// A note after an action ("queued", "joined").
    pub notice: Option<&'a str>,
}

/// `/ui/builds/{uuid}`.
pub fn build(chrome: &Chrome<'_>, p: &BuildPage<'_>, now: Timestamp) -> Markup {
    let b = p.build;
    layout(
        chrome,
        &format!("Build {}", short(b.id)),
        html! {
            p.muted { a href="/ui/" { "Projects" } " / " a href={ "/ui/projects/" (b.project) } { (b.project) } " / " }
            h1 { "Build " span.mono { (b.id) } }
            @if let Some(n) = p.notice { p.notice role="status" { (n) } }
            (summary(b, &p.actions, now))
            section {
                h2 { "Log" }
                @if p.follow.is_some() {
                    p #follow-state role="status" hidden {}
                    noscript { p.muted { "This build is still going: reload the page for new lines." } }
                }
                @if p.log_from > 0 {
                    nav.pager { a href={ "/ui/builds/" (b.id) } { "← Start of the log" } }
                }
                div.log #log data-follow=[p.follow.as_deref()] {
                    @if p.lines.is_empty() && p.log_from == 0 {
                        div.empty { @if b.phase.is_stopped() { "The log is empty." } @else { "No output yet." } }
                    }
                    @for l in &p.lines { (log_line(l)) }
                }
                @if let Some(next) = p.log_more {
                    nav.pager { a href={ "/ui/builds/" (b.id) "?log=" (next) "#L" (next + 1) } { "More of the log →" } }
                }
            }
        },
    )
}

/// `/ui/login`.
pub fn login(chrome: &Chrome<'_>, error: Option<&str>) -> Markup {
    layout(
        chrome,
        "Sign in",
        html! {
            h1 { "Sign in" }
            @if let Some(e) = error { p.notice.error role="alert" { (e) } }
            form.login method="post" action="/ui/login" {
                label for="token" { "API token" }
                input #token type="password" name="token" autocomplete="off" required autofocus;
                p.muted { "The admin token from the " code { "[api] token_file" } ", or any "
                    code { "[api.tokens.*]" } " token. It stays on the server: the browser keeps only a session cookie for 12 hours." }
                button.primary type="submit" { "Sign in" }
            }
        },
    )
}

/// Any error, as a page.
pub fn error(chrome: &Chrome<'_>, status: u16, message: &str) -> Markup {
    layout(
        chrome,
        &format!("Error {status}"),
        html! {
            h1 { "Error " (status) }
            p.notice.error { (message) }
            p { a href="/ui/" { "Back to the projects" } }
        },
    )
}

/// The badge of SPEC §4.1: `label | outcome`, with the outcome's word (colour only repeats it).
pub fn badge(label: &str, phase: Option<Phase>) -> Markup {
    let word = phase.map_or("none", status_word);
    let value = match word {
        "none" => "no builds",
        w => status_label(w),
    };
    let colour = match word {
        "success" => "#2e7d32",
        "fail" | "timed_out" | "interrupted" => "#c62828",
        "cancelled" => "#9a6700",
        _ => "#6e7781",
    };
    // Widths from a rough per-character width of 11 px Verdana: no font metrics at hand.
    let w = |s: &str| 10 + 7 * s.chars().count() as u32;
    let (lw, vw) = (w(label), w(value));
    let total = lw + vw;
    html! {
        svg xmlns="http://www.w3.org/2000/svg" width=(total) height="20" role="img"
            aria-label={ (label) ": " (value) } {
            title { (label) ": " (value) }
            rect width=(lw) height="20" fill="#555" {}
            rect x=(lw) width=(vw) height="20" fill=(colour) {}
            g fill="#fff" text-anchor="middle" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11" {
                text x=(lw / 2) y="14" { (label) }
                text x=(lw + vw / 2) y="14" { (value) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Outcome, Target, Trigger, TriggerSource};

    fn chrome() -> Chrome<'static> {
        Chrome {
            css: "/ui/assets/style.x.css",
            js: "/ui/assets/app.x.js",
            signed: None,
        }
    }

    #[test]
    fn log_lines_are_text() {
        let l = LogLine {
            n: 4,
            ts: "t\"<".into(),
            stream: "stdout".into(),
            line: "<script>alert(1)</script> \u{1b}[31mred\u{1b}[0m".into(),
        };
        let html = log_line(&l).into_string();
        assert!(!html.contains("<script>"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        assert!(html.contains(r#"<span class="f1">red</span>"#), "{html}");
        assert!(html.contains(r#"id="L5""#), "{html}");
        assert!(!html.contains('\u{1b}') && !html.contains('\n'), "{html}");
    }

    #[test]
    fn user_text_is_escaped_everywhere() {
        let mut b = Build::new_queued(
            1,
            &Target::branch("site", "<b>main</b>"),
            Trigger {
                source: TriggerSource::DeployHook,
                hook: Some((
                    crate::model::HookId::new(),
                    "<img src=x onerror=alert(1)>".into(),
                )),
            },
            Some("<i>sha</i>".into()),
            false,
            Timestamp(0),
        );
        b.phase = Phase::Stopped(Outcome::Fail);
        let html = summary(
            &b,
            &BuildActions {
                csrf: Some("\"><x>"),
                redeploy: true,
            },
            Timestamp(0),
        )
        .into_string();
        for raw in ["<b>", "<img", "<i>", "\"><x>"] {
            assert!(!html.contains(raw), "{raw} in {html}");
        }
        let page = login(&chrome(), Some("<u>bad</u>")).into_string();
        assert!(page.contains("&lt;u&gt;bad"), "{page}");
        let svg = badge("<p>", Some(Phase::Stopped(Outcome::Success))).into_string();
        assert!(svg.contains("&lt;p&gt;") && !svg.contains("<p>"), "{svg}");
        assert!(svg.contains(">success<"), "{svg}");
    }

    #[test]
    fn status_is_a_word_and_an_icon() {
        for (phase, word) in [
            (Phase::Stopped(Outcome::Success), "success"),
            (Phase::Stopped(Outcome::Fail), "failed"),
            (Phase::Stopped(Outcome::TimedOut), "timed out"),
            (Phase::Running, "running"),
            (Phase::Queued, "queued"),
        ] {
            let html = status(Some(phase)).into_string();
            assert!(html.contains(&format!(">{word}<")), "{html}");
            assert!(html.contains("<svg"), "{html}");
        }
    }

    #[test]
    fn times_carry_the_exact_time() {
        let html = time(
            Timestamp(1_700_000_000_000_000),
            Timestamp(1_700_000_120_000_000),
        )
        .into_string();
        assert_eq!(
            html,
            r#"<time datetime="2023-11-14T22:13:20.000000Z" title="2023-11-14T22:13:20.000000Z">2 min ago</time>"#
        );
    }
}
