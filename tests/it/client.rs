//! The CLI's log commands against a real daemon: `builds logs` pages through the whole log,
//! `--json` prints the stored lines, `--follow` prints the same text, and errors are one line.

use serde_json::Value;

use crate::util::{Daemon, cli, workdir_project};

#[test]
fn builds_logs_pages_through_the_whole_log_in_text_json_and_follow() {
    let wd = tempfile::tempdir().unwrap();
    // 2500 lines: more than one page (1000 lines) of GET /api/builds/{uuid}/logs.
    let d = Daemon::start(&workdir_project(
        "site",
        wd.path(),
        "seq 1 2500; echo to-stderr >&2; exit 3",
        "",
    ));
    let id = d.trigger_id("site", "main");
    d.wait_status(&id, "stopped", 60);
    let url = format!("http://{}", d.addr);
    let cfg = d.config.to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--config", &cfg]);
        cli(&a, &[("DEPLOYHOOK_URL", url.as_str())])
    };

    let (code, text, err) = run(&["builds", "logs", &id]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = text.lines().collect();
    let numbers: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    assert_eq!(numbers.len(), 2500, "every line of every page, once");
    assert_eq!(numbers.first(), Some(&"1"));
    assert_eq!(numbers.last(), Some(&"2500"));
    assert!(lines.contains(&"to-stderr"), "{text}");
    assert!(
        lines.contains(&"[deployhook] the command exited with code 3; outcome fail"),
        "{text}"
    );

    let (code, json, err) = run(&["builds", "logs", &id, "--json"]);
    assert_eq!(code, 0, "{err}");
    let objects: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(objects.len(), lines.len());
    assert_eq!(objects[0]["n"], 0);
    assert!(objects.iter().all(|o| o["stream"].is_string()));

    let (code, followed, err) = run(&["builds", "logs", &id, "--follow"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        followed, text,
        "--follow of a stopped build prints the same text"
    );

    for follow in [false, true] {
        let mut args = vec!["builds", "logs", "00000000-0000-4000-8000-000000000000"];
        if follow {
            args.push("--follow");
        }
        let (code, out, err) = run(&args);
        assert_eq!(code, 1, "follow={follow}");
        assert!(out.is_empty());
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("no build with that id"), "{err}");
    }
}
