//! `deployhook notifications list|test` (SPEC §7, v2).

use clap::Subcommand;
use serde_json::json;
use std::io::Write as _;

use serde_json::Value;

use super::{Client, Failure, print_json, table};

/// A JSON value as a table cell: `-` for null, strings without quotes.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `deployhook notifications …`.
#[derive(Subcommand, Debug)]
pub(super) enum NotificationsCmd {
    /// List recent notification and commit-status deliveries, newest first.
    List {
        /// How many (1 to 100).
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Send a test event to one sink now and print its answer.
    Test {
        /// Sink name (a `[notify.NAME]` table).
        sink: String,
    },
}

pub(super) async fn run(c: &Client, cmd: NotificationsCmd, as_json: bool) -> Result<(), Failure> {
    use http::Method;
    match cmd {
        NotificationsCmd::List { limit } => {
            let v = c
                .call(
                    Method::GET,
                    &format!("/api/notifications?limit={limit}"),
                    None,
                )
                .await?;
            if as_json {
                return print_json(&v);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .map(|a| a.as_slice())
                .unwrap_or_default()
                .iter()
                .map(|e| {
                    [
                        "created_on",
                        "kind",
                        "sink",
                        "event",
                        "build_uuid",
                        "status",
                        "attempts",
                        "last_error",
                    ]
                    .iter()
                    .map(|k| cell(&e[*k]))
                    .collect()
                })
                .collect();
            table(
                &[
                    "CREATED",
                    "KIND",
                    "SINK",
                    "EVENT",
                    "BUILD",
                    "STATUS",
                    "ATTEMPTS",
                    "LAST ERROR",
                ],
                &rows,
            )
        }
        NotificationsCmd::Test { sink } => {
            let v = c
                .call(
                    Method::POST,
                    "/api/notifications/test",
                    Some(json!({"sink": sink})),
                )
                .await?;
            let r = &v;
            if as_json {
                print_json(r)?;
            } else if let Some(status) = r["status"].as_u64() {
                outln!("{sink} answered HTTP {status}")?;
                if let Some(body) = r["body"].as_str().filter(|b| !b.is_empty()) {
                    outln!("{body}")?;
                }
            }
            match r["status"].as_u64() {
                Some(code) if (200..300).contains(&code) => Ok(()),
                Some(code) => Err(Failure::Op(format!("sink {sink} answered HTTP {code}"))),
                None => Err(Failure::Op(format!(
                    "sink {sink} did not answer: {}",
                    r["error"].as_str().unwrap_or("no answer")
                ))),
            }
        }
    }
}
