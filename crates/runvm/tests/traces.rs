//! Traces and guest logs (issue #16, docs/observability.md): with `[tracing] otlp_endpoint`, a
//! `runvm run` is one trace in which the agent's spans hang under the host's; the agent's log
//! records land in runvm's `--log` with the sandbox id; an unreachable endpoint leaves runvm
//! working and is said once.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use common::{spec, text, Host};
use runvm_telemetry::receiver::{ReceivedSpan, Receiver};

fn tracing_toml(endpoint: &str) -> String {
    format!("[tracing]\notlp_endpoint = {endpoint:?}\n")
}

#[test]
fn runvm_run_is_one_trace_with_agent_spans_under_host_spans_and_the_guest_log_in_runvm_log() {
    let receiver = Receiver::start().unwrap();
    let host = Host::new();
    let bundle = host.bundle("traced", &spec(&["echo", "traced-output"]));
    let log = host.dir.path().join("runvm.log");
    let out = host
        .cmd_configured(
            &tracing_toml(&receiver.endpoint()),
            &[
                "--log",
                log.to_str().unwrap(),
                "--log-level",
                "info",
                "run",
                "--bundle",
                bundle.to_str().unwrap(),
                "traced",
            ],
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n{}\nlog:\n{log_text}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("traced-output"));
    // runvm has exited: what it exported is in.
    let spans = receiver.wait_for(Duration::from_secs(10), |s| {
        s.iter().any(|x| x.name == "runvm run") && s.iter().any(|x| x.service == "runvm-agent")
    });
    let root = spans
        .iter()
        .find(|s| s.name == "runvm run" && s.service == "runvm")
        .unwrap_or_else(|| panic!("no `runvm run` span: {spans:#?}"));
    assert_eq!(root.parent_span_id, "", "the command's span is the root");
    let foreign: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id != root.trace_id)
        .collect();
    assert!(foreign.is_empty(), "one run, one trace: {foreign:#?}");
    let by_id: HashMap<&str, &ReceivedSpan> =
        spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let create = spans
        .iter()
        .find(|s| s.service == "runvm-agent" && s.name == "CreateContainer")
        .unwrap_or_else(|| panic!("no guest CreateContainer span: {spans:#?}\nlog:\n{log_text}"));
    let parent = by_id
        .get(create.parent_span_id.as_str())
        .unwrap_or_else(|| panic!("the guest span's parent was not exported: {create:?}"));
    assert_eq!(parent.service, "runvm", "{parent:?}");
    assert_eq!(
        parent.name, "CreateContainer",
        "the host's call span: {parent:?}"
    );
    // Every span leads up to the root: one tree.
    for span in &spans {
        let mut at = span;
        for _ in 0..64 {
            if at.parent_span_id.is_empty() {
                break;
            }
            at = by_id
                .get(at.parent_span_id.as_str())
                .unwrap_or_else(|| panic!("{span:?} has a parent that was not exported"));
        }
        assert_eq!(at.span_id, root.span_id, "{span:?} is not under the root");
    }
    for name in ["sandbox.create", "sandbox.boot", "sandbox.create_container"] {
        assert!(
            spans.iter().any(|s| s.name == name),
            "no {name} span: {spans:#?}"
        );
    }
    // The agent's own log line reached runvm's log with the sandbox id, and no guest record
    // below the asked level came along.
    let line = log_text
        .lines()
        .find(|l| l.contains("runvm-agent listening"))
        .unwrap_or_else(|| panic!("no guest log line in runvm's log:\n{log_text}"));
    assert!(line.contains("sandbox=traced"), "{line}");
    assert!(line.contains("level=info"), "{line}");
    assert!(!log_text.contains("level=debug"), "{log_text}");
    assert!(
        !log_text.contains("level=error"),
        "a plain run logs no error: {log_text}"
    );
    host.assert_nothing_left();
}

#[test]
fn an_unreachable_otlp_endpoint_leaves_runvm_working_and_is_said_once() {
    let host = Host::new();
    let bundle = host.bundle("untraced", &spec(&["echo", "still-works"]));
    // Port 1 on loopback: nothing listens, connections are refused at once.
    let out = host
        .cmd_configured(
            &tracing_toml("http://127.0.0.1:1"),
            &["run", "--bundle", bundle.to_str().unwrap(), "untraced"],
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", text(&out.stdout));
    assert!(text(&out.stdout).contains("still-works"));
    assert_eq!(
        stderr.matches("cannot export traces").count(),
        1,
        "said once: {stderr}"
    );
    assert!(stderr.contains("http://127.0.0.1:1"), "{stderr}");
    host.assert_nothing_left();
}

#[test]
fn a_bad_otlp_endpoint_is_refused_naming_it_and_what_is_valid() {
    let host = Host::new();
    for (bad, why) in [
        ("127.0.0.1:4317", "http://HOST:PORT"),
        ("https://collector:4317", "https://"),
    ] {
        let out = host
            .cmd_configured(&tracing_toml(bad), &["list"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{bad} accepted");
        assert!(
            stderr.contains("tracing.otlp_endpoint")
                && stderr.contains(bad)
                && stderr.contains(why),
            "{stderr}"
        );
    }
}
