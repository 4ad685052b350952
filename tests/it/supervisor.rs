//! The daemon's supervisor handle (`deployhook::supervisor::Supervisor`) driven directly,
//! against the real binary's supervisor mode: reports, terminate, its own escalation when a
//! supervisor stops answering, and a drop that leaves neither a build process nor a zombie.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deployhook::supervisor::{Event, Job, MainStatus, Supervisor, SupervisorPool};
use tokio::io::{AsyncBufReadExt as _, BufReader};

use crate::util::{BIN, alive};

fn pool() -> Arc<SupervisorPool> {
    SupervisorPool::new(PathBuf::from(BIN))
}

fn job(script: &str, grace_ms: u64) -> Job {
    Job {
        grace_ms,
        workdir: "/".into(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
    }
}

/// Whether `/proc/PID` exists at all: a zombie still has it, a reaped process does not.
fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Waits (on real time, with a deadline) until `f` holds.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `script`, which must print one pid per line on stdout first; returns the handle and
/// those pids once printed.
async fn start_and_read_pids(script: &str, grace_ms: u64, n: usize) -> (Supervisor, Vec<i32>) {
    let mut sup = Supervisor::start(&pool(), &job(script, grace_ms), Duration::from_secs(2))
        .await
        .expect("the supervisor starts");
    let (stdout, _stderr) = sup.take_output();
    let mut lines = BufReader::new(stdout.expect("a stdout pipe")).lines();
    let mut pids = Vec::new();
    while pids.len() < n {
        let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
            .await
            .expect("the job prints its pids in time")
            .unwrap()
            .expect("a pid line");
        pids.push(line.trim().parse().expect("a pid"));
    }
    (sup, pids)
}

#[tokio::test]
async fn a_job_reports_its_exit_then_finishes_and_is_reaped() {
    let mut sup = Supervisor::start(&pool(), &job("echo out; exit 3", 1000), Duration::ZERO)
        .await
        .unwrap();
    let pid = sup.pid().expect("a running supervisor");
    let (stdout, _) = sup.take_output();
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stdout.unwrap(), &mut out)
        .await
        .unwrap();
    assert_eq!(out, "out\n");
    assert_eq!(
        sup.next_event().await,
        Event::MainEnded(MainStatus::Exited(3))
    );
    assert_eq!(sup.next_event().await, Event::Finished);
    assert_eq!(
        sup.next_event().await,
        Event::Finished,
        "finished stays finished"
    );
    sup.close().await;
    assert!(!exists(pid), "the supervisor is reaped by close()");
}

#[tokio::test]
async fn a_job_that_cannot_start_reports_why() {
    let mut j = job("true", 1000);
    j.argv = vec!["/nonexistent/deployhook-test".into()];
    let mut sup = Supervisor::start(&pool(), &j, Duration::ZERO)
        .await
        .unwrap();
    match sup.next_event().await {
        Event::MainEnded(MainStatus::SpawnError(m)) => {
            assert!(m.contains("/nonexistent/deployhook-test"), "{m}")
        }
        other => panic!("expected a spawn error, got {other:?}"),
    }
    assert_eq!(sup.next_event().await, Event::Finished);
    sup.close().await;
}

#[tokio::test]
async fn terminate_stops_the_main_process_and_what_it_left_behind() {
    // The background sleep is left behind when the main process dies of the SIGTERM.
    let (mut sup, pids) =
        start_and_read_pids("sleep 1000 & echo $!; echo $$; exec sleep 1000", 5000, 2).await;
    assert!(pids.iter().all(|&p| alive(p)));
    sup.terminate().await;
    assert_eq!(
        sup.next_event().await,
        Event::MainEnded(MainStatus::Signaled(15))
    );
    assert_eq!(sup.next_event().await, Event::Finished);
    for p in pids {
        assert!(!alive(p), "process {p} of the job survived");
    }
    sup.close().await;
}

/// A supervisor that stops answering (here: SIGSTOPped) is escalated by the handle itself: `K`
/// after the grace and the slack, then SIGKILL to the supervisor and the job's group (2 × the
/// slack with a zero grace: the slack is shortened from 3 s to 300 ms).
#[tokio::test]
async fn a_supervisor_that_does_not_answer_is_killed_with_its_job() {
    let (sup, pids) = start_and_read_pids("sleep 1000 & echo $!; exec sleep 1000", 0, 1).await;
    let mut sup = sup.with_slack(Duration::from_millis(300));
    let sup_pid = sup.pid().unwrap();
    // Wait for the job's main process (the exec'd sleep, the group leader) to be running.
    let group_leader = eventually_child_of(sup_pid).await;
    // And for the supervisor to have reported the job's group, which it does before it starts
    // its control thread: stopped before that report, it would leave the handle no group to
    // kill (this test failed 1 run in 8 that way).
    eventually("the supervisor's control thread", || {
        has_thread(sup_pid, "control")
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup_pid as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    sup.terminate().await;
    assert_eq!(sup.next_event().await, Event::Finished);
    sup.close().await;
    assert!(!exists(sup_pid), "the supervisor is killed and reaped");
    eventually("the job's processes are gone", || {
        !alive(group_leader) && pids.iter().all(|&p| !alive(p))
    })
    .await;
}

/// Whether process `pid` has a thread named `name`.
fn has_thread(pid: u32, name: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
}

/// The first child of `pid`, once it has one.
async fn eventually_child_of(pid: u32) -> i32 {
    let mut child = None;
    eventually("the job's main process starts", || {
        child = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok());
        child.is_some()
    })
    .await;
    child.unwrap()
}

#[tokio::test]
async fn dropping_the_handle_kills_the_job_and_reaps_the_supervisor() {
    let (sup, pids) = start_and_read_pids("sleep 1000 & echo $!; echo $$; wait", 60_000, 2).await;
    let sup_pid = sup.pid().unwrap();
    drop(sup);
    eventually("the job's processes are gone", || {
        pids.iter().all(|&p| !alive(p))
    })
    .await;
    eventually("the supervisor is reaped, not a zombie", || {
        !exists(sup_pid)
    })
    .await;
}
