//! The status pages over plain HTTP (SPEC §6, the badge of §4.1, HOSTILE 30): one test per
//! sentence of the contract. The browser tests (`browser.rs`) cover what needs a real DOM.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::util::*;

/// The answer to the sign-in form sent with `token`.
pub fn log_in(d: &Daemon, token: &str) -> Resp {
    post_form(d, "/ui/login", None, &format!("token={}", urlencode(token)))
}

/// Signs in with `token`; returns the `Cookie` header value of the session.
pub fn sign_in(d: &Daemon, token: &str) -> String {
    let r = log_in(d, token);
    assert_eq!(r.status, 303, "{}", String::from_utf8_lossy(&r.body));
    let set = r.header("set-cookie").expect("a session cookie");
    set.split(';').next().unwrap().to_string()
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// GET with a cookie.
pub fn get(d: &Daemon, path: &str, cookie: Option<&str>) -> Resp {
    let h: Vec<(&str, &str)> = cookie.map(|c| ("Cookie", c)).into_iter().collect();
    request(d.addr, "GET", path, &h, b"")
}

/// POST a form with a cookie.
pub fn post_form(d: &Daemon, path: &str, cookie: Option<&str>, form: &str) -> Resp {
    let mut h = vec![("Content-Type", "application/x-www-form-urlencoded")];
    if let Some(c) = cookie {
        h.push(("Cookie", c));
    }
    request(d.addr, "POST", path, &h, form.as_bytes())
}

pub fn text(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

/// The CSRF token in a page's forms.
pub fn csrf_of(page: &str) -> String {
    let at = page
        .find(r#"name="csrf" value=""#)
        .unwrap_or_else(|| panic!("no CSRF field in {page}"));
    let rest = &page[at + r#"name="csrf" value=""#.len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

fn project(dir: &std::path::Path, command: &str) -> String {
    workdir_project("site", dir, command, "")
}

fn assert_security_headers(r: &Resp, what: &str) {
    let csp = r
        .header("content-security-policy")
        .unwrap_or_else(|| panic!("{what}: no CSP"));
    assert!(csp.contains("frame-ancestors 'none'"), "{what}: {csp}");
    assert!(csp.contains("script-src 'self'"), "{what}: {csp}");
    assert!(!csp.contains("unsafe-inline"), "{what}: {csp}");
    assert_eq!(
        r.header("x-content-type-options"),
        Some("nosniff"),
        "{what}"
    );
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"), "{what}");
}

#[test]
fn pages_without_a_session_redirect_to_the_login_page() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&project(wd.path(), "true"));
    let id = d.trigger_id("site", "main");
    for path in [
        "/ui/".to_string(),
        "/ui/projects/site".into(),
        format!("/ui/builds/{id}"),
        format!("/ui/builds/{id}/events"),
    ] {
        let r = get(&d, &path, None);
        assert_eq!(r.status, 303, "{path}");
        assert_eq!(r.header("location"), Some("/ui/login"), "{path}");
        assert_security_headers(&r, &path);
    }
    // A cookie naming no session is no session.
    let r = get(&d, "/ui/", Some("dh_session=made-up"));
    assert_eq!(r.header("location"), Some("/ui/login"));
    assert_eq!(get(&d, "/ui", None).header("location"), Some("/ui/"));
    let r = get(&d, "/ui/login", None);
    assert_eq!(r.status, 200);
    assert!(text(&r).contains(r#"name="token""#));
}

#[test]
fn signing_in_sets_the_session_cookie_of_the_spec() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&project(wd.path(), "true"));
    let r = log_in(&d, &d.token);
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/ui/"));
    let set = r.header("set-cookie").unwrap();
    let attrs: Vec<&str> = set.split(';').map(str::trim).collect();
    for a in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=43200"] {
        assert!(attrs.contains(&a), "{a} missing in {set}");
    }
    // public_url is plain http here: no Secure.
    assert!(!attrs.contains(&"Secure"), "{set}");
    // The cookie holds a random id, never the token.
    assert!(!set.contains(&d.token), "{set}");
    let cookie = attrs[0];
    assert!(
        cookie.starts_with("dh_session=") && cookie.len() > 40,
        "{cookie}"
    );
    let r = get(&d, "/ui/", Some(cookie));
    assert_eq!(r.status, 200);
    assert!(text(&r).contains("signed in (admin)"));
    assert!(!text(&r).contains(&d.token));
    // Two sign-ins, two sessions.
    assert_ne!(sign_in(&d, &d.token), sign_in(&d, &d.token));

    // A wrong or empty token: 401, the form again, no cookie.
    for body in ["token=wrong", "token=", "", &format!("token={}x", d.token)] {
        let r = post_form(&d, "/ui/login", None, body);
        assert_eq!(r.status, 401, "{body}");
        assert!(r.header("set-cookie").is_none(), "{body}");
        assert!(text(&r).contains("not an API token"), "{body}");
    }
    // The token never reaches the daemon's log.
    assert!(!d.logs().contains(&d.token));
}

#[test]
fn the_cookie_is_secure_when_public_url_is_https() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_server(
        "public_url = \"https://deploy.example.com\"\n",
        &project(wd.path(), "true"),
    );
    let r = log_in(&d, &d.token);
    let set = r.header("set-cookie").unwrap();
    assert!(set.split(';').any(|a| a.trim() == "Secure"), "{set}");
}

#[test]
fn every_page_sends_the_security_headers() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&project(wd.path(), "echo hi"));
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "stopped", 30);
    let c = sign_in(&d, &d.token);
    for path in [
        "/ui/login".to_string(),
        "/ui/".into(),
        "/ui/projects/site".into(),
        format!("/ui/builds/{id}"),
        "/ui/projects/nope".into(),
        "/ui/nothing/here".into(),
    ] {
        let r = get(&d, &path, Some(&c));
        assert_security_headers(&r, &path);
        assert!(
            r.header("content-type").unwrap().starts_with("text/html"),
            "{path}"
        );
    }
    assert_eq!(get(&d, "/ui/projects/nope", Some(&c)).status, 404);
    let r = post_form(&d, "/ui/projects/site/trigger", Some(&c), "csrf=x");
    assert_security_headers(&r, "a refused POST");
}

#[test]
fn pages_show_projects_builds_hooks_and_logs() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&project(
        wd.path(),
        "echo first line; echo oops >&2; exit 3",
    ));
    let (_, hook_path) = d.create_hook("site", "cms", "main");
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "stopped", 30);
    let c = sign_in(&d, &d.token);

    let index = text(&get(&d, "/ui/", Some(&c)));
    assert!(index.contains(r#"href="/ui/projects/site""#), "{index}");
    assert!(index.contains("<code>main</code>") && index.contains("<code>other</code>"));
    assert!(index.contains(r#"data-status="fail""#), "{index}");
    assert!(index.contains(">failed<"), "outcome by word: {index}");

    let page = text(&get(&d, "/ui/projects/site", Some(&c)));
    assert!(page.contains(">cms<"), "hook by name: {page}");
    let token = hook_path.trim_start_matches("/hooks/");
    assert!(!page.contains(token), "never the hook token");
    assert!(page.contains(&format!("/ui/builds/{id}")), "{page}");
    assert!(page.contains(r#"action="/ui/projects/site/trigger""#));

    let page = text(&get(&d, &format!("/ui/builds/{id}"), Some(&c)));
    assert!(
        page.contains("first line") && page.contains("oops"),
        "{page}"
    );
    assert!(page.contains(r#"class="ln stderr""#), "{page}");
    assert!(page.contains("<dt>Exit code</dt><dd>3</dd>"), "{page}");
    // Relative time, exact time on hover.
    assert!(
        page.contains("<time datetime=\"") && page.contains("title=\""),
        "{page}"
    );
    // A stopped build's page does not follow.
    assert!(!page.contains("data-follow"), "{page}");
    assert!(!page.contains("Cancel build"), "{page}");
    assert_eq!(get(&d, "/ui/builds/not-a-uuid", Some(&c)).status, 404);
    assert_eq!(
        get(
            &d,
            "/ui/builds/00000000-0000-4000-8000-000000000000",
            Some(&c)
        )
        .status,
        404
    );
}

#[test]
fn user_supplied_text_is_escaped() {
    let wd = tempfile::tempdir().unwrap();
    // A log with HTML, ANSI colours, other escapes and a 64 KiB line.
    let cmd = "printf '<script>alert(1)</script>\\n'; printf '\\033[31mred\\033[0m \\033]0;title\\007plain\\n'; \
               head -c 65536 /dev/zero | tr '\\0' 'x'; echo";
    let d = Daemon::start(&project(wd.path(), cmd));
    d.create_hook("site", "<img src=x onerror=alert(2)>", "main");
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "stopped", 30);
    let c = sign_in(&d, &d.token);
    let page = text(&get(&d, &format!("/ui/builds/{id}"), Some(&c)));
    assert!(!page.contains("<script>alert"), "raw HTML in the page");
    assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(
        page.contains(r#"<span class="f1">red</span>"#),
        "ANSI colour as a class"
    );
    assert!(!page.contains('\u{1b}'), "no raw escape byte");
    assert!(!page.contains("title\u{7}") && page.contains(" plain"));
    assert!(
        page.contains(&"x".repeat(65536)),
        "the long line is shown whole"
    );
    let page = text(&get(&d, "/ui/projects/site", Some(&c)));
    assert!(!page.contains("<img src=x"), "{page}");
    assert!(page.contains("&lt;img src=x onerror=alert(2)&gt;"));
}

#[test]
fn actions_need_the_session_csrf_token() {
    // Without supersede, the second trigger queues behind the running one.
    let (d, _wd) = Daemon::start_workdir("site", "sleep 30", "cancel_superseded = false");
    let c = sign_in(&d, &d.token);
    let page = text(&get(&d, "/ui/projects/site", Some(&c)));
    let csrf = csrf_of(&page);
    let builds = |d: &Daemon| {
        d.api("GET", "/api/projects/site/builds", None).json()["result"]
            .as_array()
            .unwrap()
            .len()
    };
    // Missing, wrong, another session's: 403, and nothing happens.
    let other = csrf_of(&text(&get(&d, "/ui/", Some(&sign_in(&d, &d.token)))));
    for form in [
        "branch=main".to_string(),
        "branch=main&csrf=".into(),
        "branch=main&csrf=wrong".into(),
        format!("branch=main&csrf={other}"),
    ] {
        let r = post_form(&d, "/ui/projects/site/trigger", Some(&c), &form);
        assert_eq!(r.status, 403, "{form}");
    }
    // Without a session at all.
    let r = post_form(
        &d,
        "/ui/projects/site/trigger",
        None,
        &format!("branch=main&csrf={csrf}"),
    );
    assert_eq!(r.status, 403);
    // From another site (the browser says so), even with the token.
    let r = request(
        d.addr,
        "POST",
        "/ui/projects/site/trigger",
        &[
            ("Cookie", c.as_str()),
            ("Sec-Fetch-Site", "cross-site"),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        format!("branch=main&csrf={csrf}").as_bytes(),
    );
    assert_eq!(r.status, 403);
    assert_eq!(builds(&d), 0);

    // The right token: a redirect to the new build.
    let form = format!("branch=main&csrf={csrf}");
    let r = post_form(&d, "/ui/projects/site/trigger", Some(&c), &form);
    assert_eq!(r.status, 303, "{}", text(&r));
    let loc = r.header("location").unwrap().to_string();
    assert!(
        loc.starts_with("/ui/builds/") && loc.ends_with("?done=queued"),
        "{loc}"
    );
    let first = loc["/ui/builds/".len()..loc.find('?').unwrap()].to_string();
    assert_eq!(d.build(&first)["build_trigger_source"], "api");
    d.wait_status(&first, "running", 30);
    // A second trigger queues one; a third joins it.
    let r = post_form(&d, "/ui/projects/site/trigger", Some(&c), &form);
    let second = r.header("location").unwrap().to_string();
    let r = post_form(&d, "/ui/projects/site/trigger", Some(&c), &form);
    let third = r.header("location").unwrap().to_string();
    assert!(third.ends_with("?done=joined"), "{third}");
    assert_eq!(
        second.split('?').next(),
        third.split('?').next(),
        "the joined build"
    );
    let joined = text(&get(&d, &third, Some(&c)));
    assert!(joined.contains("joined"), "{joined}");
    // Counted as the API's triggers are.
    let metrics = text(&d.api("GET", "/metrics", None));
    for line in [
        "deployhook_triggers_total{source=\"api\",result=\"created\"} 2",
        "deployhook_triggers_total{source=\"api\",result=\"deduplicated\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    // A branch the project does not build.
    let r = post_form(
        &d,
        "/ui/projects/site/trigger",
        Some(&c),
        &format!("branch=nope&csrf={csrf}"),
    );
    assert_eq!(r.status, 400);

    // Cancel: wrong token refused, right token cancels and redirects to the build.
    let cancel = format!("/ui/builds/{first}/cancel");
    assert_eq!(post_form(&d, &cancel, Some(&c), "csrf=nope").status, 403);
    assert_eq!(d.build(&first)["status"], "running");
    let r = post_form(&d, &cancel, Some(&c), &format!("csrf={csrf}"));
    assert_eq!(r.status, 303);
    assert_eq!(
        r.header("location"),
        Some(format!("/ui/builds/{first}?done=cancelled").as_str())
    );
    let b = d.wait_status(&first, "stopped", 30);
    assert_eq!(b["build_outcome"], "cancelled");
    assert_eq!(b["cancel_reason"], "api");
    // Cancelling a stopped build: 409.
    assert_eq!(
        post_form(&d, &cancel, Some(&c), &format!("csrf={csrf}")).status,
        409
    );
    // GET on an action is not an action.
    assert_eq!(get(&d, &cancel, Some(&c)).status, 404);
}

#[test]
fn logout_ends_the_session() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&project(wd.path(), "true"));
    let c = sign_in(&d, &d.token);
    let csrf = csrf_of(&text(&get(&d, "/ui/", Some(&c))));
    assert_eq!(
        post_form(&d, "/ui/logout", Some(&c), "csrf=bad").status,
        403
    );
    assert_eq!(get(&d, "/ui/", Some(&c)).status, 200);
    let r = post_form(&d, "/ui/logout", Some(&c), &format!("csrf={csrf}"));
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/ui/login"));
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    // The old cookie names no session any more.
    assert_eq!(
        get(&d, "/ui/", Some(&c)).header("location"),
        Some("/ui/login")
    );
}

#[test]
fn a_reload_that_rotates_the_token_ends_its_sessions() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&project(wd.path(), "true"));
    let c = sign_in(&d, &d.token);
    assert_eq!(get(&d, "/ui/", Some(&c)).status, 200);
    std::fs::write(d.dir.join("admin.token"), "a-brand-new-admin-token\n").unwrap();
    d.signal("HUP");
    eventually(30, "the rotated token's session to end", || {
        get(&d, "/ui/", Some(&c)).status == 303
    });
    // The new token signs in.
    let c2 = sign_in(&d, "a-brand-new-admin-token");
    assert_eq!(get(&d, "/ui/", Some(&c2)).status, 200);
}

#[test]
fn public_pages_are_readable_without_a_session_but_never_act() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&format!(
        "[ui]\npublic = true\n{}",
        project(wd.path(), "sleep 30")
    ));
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "running", 30);
    let r = get(&d, "/ui/", None);
    assert_eq!(r.status, 200);
    let page = text(&get(&d, "/ui/projects/site", None));
    assert!(page.contains("Sign in</a> to trigger"), "{page}");
    assert!(!page.contains(r#"name="csrf""#), "no action forms: {page}");
    let page = text(&get(&d, &format!("/ui/builds/{id}"), None));
    assert!(!page.contains("Cancel build"), "{page}");
    let r = post_form(&d, &format!("/ui/builds/{id}/cancel"), None, "csrf=");
    assert_eq!(r.status, 403);
    let r = post_form(&d, "/ui/projects/site/trigger", None, "branch=main&csrf=");
    assert_eq!(r.status, 403);
    assert_eq!(d.build(&id)["status"], "running");
    // The badge needs no token in public mode.
    let r = get(&d, "/badge/site.svg", None);
    assert_eq!(r.status, 200);
}

#[test]
fn disabled_pages_answer_404() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&format!(
        "[ui]\nenabled = false\n{}",
        project(wd.path(), "true")
    ));
    for path in ["/ui/", "/ui", "/ui/login", "/ui/projects/site"] {
        assert_eq!(get(&d, path, None).status, 404, "{path}");
    }
    let r = log_in(&d, &d.token);
    assert_eq!(r.status, 404);
    assert!(r.header("set-cookie").is_none());
}

#[test]
fn assets_are_content_hashed_and_cached_for_a_year() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&project(wd.path(), "true"));
    let page = text(&get(&d, "/ui/login", None));
    let href = |attr: &str| {
        let at = page.find(attr).unwrap() + attr.len();
        page[at..at + page[at..].find('"').unwrap()].to_string()
    };
    let (css, js) = (href(r#"rel="stylesheet" href=""#), href(r#"script src=""#));
    assert!(
        css.starts_with("/ui/assets/style.") && css.ends_with(".css"),
        "{css}"
    );
    assert!(
        js.starts_with("/ui/assets/app.") && js.ends_with(".js"),
        "{js}"
    );
    for (path, ty) in [(&css, "text/css"), (&js, "text/javascript")] {
        let r = get(&d, path, None);
        assert_eq!(r.status, 200, "{path}");
        assert!(r.header("content-type").unwrap().starts_with(ty));
        assert_eq!(
            r.header("cache-control"),
            Some("public, max-age=31536000, immutable")
        );
    }
    assert_eq!(
        get(&d, "/ui/assets/style.0000000000000000.css", None).status,
        404
    );
    // Nothing from another origin.
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "{page}"
    );
}

/// Reads an SSE stream until `event: end` (or the deadline); returns the raw text.
fn read_events(
    addr: std::net::SocketAddr,
    path: &str,
    cookie: &str,
    last_id: Option<u64>,
) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let extra = last_id.map_or(String::new(), |n| format!("Last-Event-ID: {n}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let r = parse_response(&buf);
    (
        r.header("content-type").unwrap_or_default().to_string(),
        String::from_utf8_lossy(&r.body).into_owned(),
    )
}

fn event_ids(stream: &str) -> Vec<u64> {
    stream
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|n| n.parse().unwrap())
        .collect()
}

#[test]
fn the_live_log_is_an_event_stream_that_resumes_and_ends() {
    let wd = tempfile::tempdir().unwrap();
    let marker = wd.path().join("go");
    let cmd = format!(
        "for i in 1 2 3; do echo line $i; done; while [ ! -e {} ]; do sleep 0.1; done; echo '<b>last</b>'",
        marker.display()
    );
    let d = Daemon::start(&project(wd.path(), &cmd));
    let id = d.trigger_id("site", "main");
    let c = sign_in(&d, &d.token);
    eventually(30, "three lines", || d.log_lines(&id).len() >= 3);
    let page = text(&get(&d, &format!("/ui/builds/{id}"), Some(&c)));
    assert!(
        page.contains(&format!(
            r#"data-follow="/ui/builds/{id}/events?cursor=3&amp;status=running""#
        )),
        "a running build's page follows from its last line: {page}"
    );
    // Let the build finish while a follower reads from line 1.
    let path = format!("/ui/builds/{id}/events?cursor=1&status=running");
    let started = Instant::now();
    let reader = {
        let (addr, c, path) = (d.addr, c.clone(), path.clone());
        std::thread::spawn(move || read_events(addr, &path, &c, None))
    };
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&marker, "").unwrap();
    let (ty, stream) = reader.join().unwrap();
    // The page said "running", so no status event came before the build stopped.
    assert_eq!(stream.matches("event: status").count(), 1, "{stream}");
    assert_eq!(ty, "text/event-stream");
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the stream ended"
    );
    // Lines 2 to 4, then the daemon's closing `system` line.
    assert_eq!(event_ids(&stream), vec![2, 3, 4, 5], "{stream}");
    assert!(stream.contains("&lt;b&gt;last&lt;/b&gt;"), "{stream}");
    // The stopped status comes after the last line, then the end.
    let status_at = stream.rfind("event: status").expect("a status event");
    assert!(status_at > stream.find("id: 4").unwrap(), "{stream}");
    assert!(
        stream[status_at..].contains(r#"data-status="success""#),
        "{stream}"
    );
    assert!(stream.trim_end().ends_with("event: end\ndata:"), "{stream}");
    // A reconnect with Last-Event-ID resumes after that line, whatever the URL says.
    let (_, again) = read_events(d.addr, &path, &c, Some(3));
    assert_eq!(event_ids(&again), vec![4, 5], "{again}");
}

#[test]
fn the_badge_shows_the_last_stopped_outcome_to_token_holders() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&project(
        wd.path(),
        "[ \"$DEPLOYHOOK_BRANCH\" = main ] || exit 1",
    ));
    let auth = format!("Bearer {}", d.token);
    let badge = |path: &str, auth: Option<&str>| {
        let h: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        request(d.addr, "GET", path, &h, b"")
    };
    // No builds yet.
    let r = badge("/badge/site.svg", Some(&auth));
    assert_eq!(r.status, 200);
    assert!(text(&r).contains("no builds"), "{}", text(&r));
    let ok = d.trigger_id("site", "main");
    d.wait_status(&ok, "stopped", 30);
    let bad = d.trigger_id("site", "other");
    d.wait_status(&bad, "stopped", 30);
    let r = badge("/badge/site.svg", Some(&auth));
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("image/svg+xml")
    );
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    let svg = text(&r);
    assert!(
        svg.starts_with("<svg") && svg.contains(">success<"),
        "default branch main: {svg}"
    );
    let svg = text(&badge("/badge/site.svg?branch=other", Some(&auth)));
    assert!(svg.contains(">failed<"), "{svg}");
    // Without a token (not public): 401; a wrong one too.
    assert_eq!(badge("/badge/site.svg", None).status, 401);
    assert_eq!(badge("/badge/site.svg", Some("Bearer wrong")).status, 401);
    assert_eq!(badge("/badge/nope.svg", Some(&auth)).status, 404);
    assert_eq!(
        badge("/badge/site.svg?branch=nope", Some(&auth)).status,
        404
    );
    assert_eq!(badge("/badge/site.png", Some(&auth)).status, 404);
    assert_eq!(badge("/badge/site.svg?branch=%zz", Some(&auth)).status, 400);
    let svg = text(&badge("/badge/site.svg?branch=%6fther", Some(&auth)));
    assert!(svg.contains(">failed<"), "percent-decoded: {svg}");
}

#[test]
fn redeploy_repeats_a_build_and_needs_the_csrf_token() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&project(wd.path(), "echo deployed $DEPLOYHOOK_BRANCH"));
    let old = d.trigger_id("site", "other");
    d.wait_status(&old, "stopped", 30);
    let c = sign_in(&d, &d.token);
    let page = text(&get(&d, &format!("/ui/builds/{old}"), Some(&c)));
    let action = format!("/ui/builds/{old}/redeploy");
    assert!(page.contains(&format!(r#"action="{action}""#)), "{page}");
    let csrf = csrf_of(&page);
    assert_eq!(post_form(&d, &action, Some(&c), "csrf=forged").status, 403);
    assert_eq!(
        post_form(&d, &action, None, &format!("csrf={csrf}")).status,
        403
    );
    let r = post_form(&d, &action, Some(&c), &format!("csrf={csrf}"));
    assert_eq!(r.status, 303, "{}", text(&r));
    let loc = r.header("location").unwrap();
    assert!(loc.ends_with("?done=redeployed"), "{loc}");
    let new = &loc["/ui/builds/".len()..loc.find('?').unwrap()];
    assert_ne!(new, old);
    let b = d.wait_status(new, "stopped", 30);
    assert_eq!(b["redeploy_of"], old.as_str());
    assert_eq!(b["branch"], "other");
    let page = text(&get(&d, loc, Some(&c)));
    assert!(page.contains("Redeploy queued."), "{page}");
    assert!(
        page.contains(&format!(r#"href="/ui/builds/{old}""#)),
        "links the original: {page}"
    );
}

#[test]
fn a_project_page_lists_builds_newest_first_in_pages() {
    let (d, _wd) = Daemon::start_workdir("site", "true", "project_builds_per_minute = 100");
    let mut ids = Vec::new();
    for _ in 0..27 {
        let id = d.trigger_id("site", "main");
        d.wait_status(&id, "stopped", 30);
        ids.push(id);
    }
    let c = sign_in(&d, &d.token);
    let rows = |page: &str| -> Vec<String> {
        page.split(r#"<a class="mono" href="/ui/builds/"#)
            .skip(1)
            .map(|s| s[..36].to_string())
            .collect()
    };
    let page = text(&get(&d, "/ui/projects/site", Some(&c)));
    let first = rows(&page);
    assert_eq!(first.len(), 25, "{page}");
    assert_eq!(first[0], ids[26], "newest first");
    let at = page
        .find("/ui/projects/site?cursor=")
        .expect("a link to older builds");
    let next = &page[at..at + page[at..].find('"').unwrap()];
    let page = text(&get(&d, &next.replace("&amp;", "&"), Some(&c)));
    assert_eq!(rows(&page), vec![ids[1].clone(), ids[0].clone()], "{page}");
    assert!(!page.contains("?cursor="), "the last page links no further");
    assert_eq!(
        get(&d, "/ui/projects/site?cursor=junk", Some(&c)).status,
        400
    );
}

#[test]
fn a_glob_branch_is_triggered_by_name() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&format!(
        "[projects.site]\nbranches = [\"main\", \"release/*\"]\nworkdir = \"{}\"\ncommand = \"true\"\n",
        wd.path().display()
    ));
    let c = sign_in(&d, &d.token);
    let page = text(&get(&d, "/ui/projects/site", Some(&c)));
    assert!(
        page.contains(r#"type="text" name="branch" placeholder="release/*""#),
        "{page}"
    );
    let csrf = csrf_of(&page);
    let r = post_form(
        &d,
        "/ui/projects/site/trigger",
        Some(&c),
        &format!("csrf={csrf}&branch=release%2F1.2"),
    );
    assert_eq!(r.status, 303, "{}", text(&r));
    let loc = r.header("location").unwrap();
    let id = &loc["/ui/builds/".len()..loc.find('?').unwrap()];
    assert_eq!(d.build(id)["branch"], "release/1.2");
    let r = post_form(
        &d,
        "/ui/projects/site/trigger",
        Some(&c),
        &format!("csrf={csrf}&branch=feature%2Fx"),
    );
    assert_eq!(r.status, 400);
    assert!(text(&r).contains("feature/x"), "{}", text(&r));
}

#[test]
fn a_session_has_its_token_scope_and_projects() {
    let wd = tempfile::tempdir().unwrap();
    let d = Daemon::start(&format!(
        "[api.tokens.viewer]\ntoken_file = \"viewer.token\"\nscope = \"read\"\nprojects = [\"site\"]\n\
         [api.tokens.ci]\ntoken_file = \"ci.token\"\nscope = \"trigger\"\nprojects = [\"site\"]\n{}{}",
        workdir_project("site", wd.path(), "true", ""),
        workdir_project("docs", wd.path(), "true", "")
    ));
    let read_token = std::fs::read_to_string(d.dir.join("viewer.token")).unwrap();
    let ci_token = std::fs::read_to_string(d.dir.join("ci.token")).unwrap();
    let docs_build = d.trigger_id("docs", "main");
    d.wait_status(&docs_build, "stopped", 30);

    // Read scope, one project: sees only it, and no buttons.
    let c = sign_in(&d, read_token.trim());
    let index = text(&get(&d, "/ui/", Some(&c)));
    assert!(index.contains("signed in (read)"), "{index}");
    assert!(index.contains(r#"href="/ui/projects/site""#), "{index}");
    assert!(!index.contains(r#"href="/ui/projects/docs""#), "{index}");
    assert_eq!(get(&d, "/ui/projects/docs", Some(&c)).status, 403);
    assert_eq!(
        get(&d, &format!("/ui/builds/{docs_build}"), Some(&c)).status,
        403
    );
    let page = text(&get(&d, "/ui/projects/site", Some(&c)));
    assert!(
        page.contains("may read this project but not trigger"),
        "{page}"
    );
    let csrf = csrf_of(&page); // the logout form's
    let r = post_form(
        &d,
        "/ui/projects/site/trigger",
        Some(&c),
        &format!("branch=main&csrf={csrf}"),
    );
    assert_eq!(r.status, 403, "read scope cannot trigger");

    // Trigger scope on site: triggers site, not docs.
    let c = sign_in(&d, ci_token.trim());
    let csrf = csrf_of(&text(&get(&d, "/ui/projects/site", Some(&c))));
    let form = format!("branch=main&csrf={csrf}");
    assert_eq!(
        post_form(&d, "/ui/projects/site/trigger", Some(&c), &form).status,
        303
    );
    assert_eq!(
        post_form(&d, "/ui/projects/docs/trigger", Some(&c), &form).status,
        403
    );

    // The badge: any scope, but only its projects.
    let auth = format!("Bearer {}", read_token.trim());
    let h = [("Authorization", auth.as_str())];
    assert_eq!(
        request(d.addr, "GET", "/badge/site.svg", &h, b"").status,
        200
    );
    let r = request(d.addr, "GET", "/badge/docs.svg", &h, b"");
    r.assert_error(403, 1403, "", "the badge of another project");

    // A reload that removes the token ends its sessions.
    let c = sign_in(&d, read_token.trim());
    let config = std::fs::read_to_string(&d.config).unwrap();
    let without = config.replace(
        "[api.tokens.viewer]\ntoken_file = \"viewer.token\"\nscope = \"read\"\nprojects = [\"site\"]\n",
        "",
    );
    assert_ne!(config, without);
    std::fs::write(&d.config, without).unwrap();
    d.signal("HUP");
    eventually(30, "the removed token's session to end", || {
        get(&d, "/ui/", Some(&c)).status == 303
    });
}
