//! Bad input is refused with runc's messages, a non-zero exit, and nothing made or leaked.

mod common;

use common::{assert_fails, spec, Host};

#[test]
fn bad_bundles_are_refused_before_any_vm_boots() {
    let host = Host::new();
    let missing = host.dir.path().join("nonexistent");
    let out = host.run(&["create", "--bundle", missing.to_str().unwrap(), "c1"]);
    assert_fails(&out, missing.to_str().unwrap());
    assert_eq!(out.status.code(), Some(1));

    let mut bad = spec(&["sh"]);
    bad["process"]["args"] = serde_json::json!("sh");
    let b = host.bundle("bad", &bad);
    let out = host.run(&["run", "--bundle", b.to_str().unwrap(), "c1"]);
    assert_fails(&out, "process.args");

    let b = host.bundle("broken", &spec(&["sh"]));
    std::fs::write(b.join("config.json"), "{\"ociVersion\": \"1.0.2\", ").unwrap();
    assert_fails(
        &host.run(&["create", "--bundle", b.to_str().unwrap(), "c1"]),
        "config.json",
    );

    let b = host.bundle("good", &spec(&["sh"]));
    assert_fails(
        &host.run(&["create", "--bundle", b.to_str().unwrap(), "../x"]),
        "invalid id",
    );
    host.assert_nothing_left();
}

#[test]
fn unknown_containers_do_not_exist() {
    let host = Host::new();
    for args in [
        &["state", "nope"][..],
        &["start", "nope"],
        &["kill", "nope", "KILL"],
        &["delete", "nope"],
        &["pause", "nope"],
        &["resume", "nope"],
        &["ps", "nope"],
        &["exec", "nope", "true"],
        &["events", "--stats", "nope"],
        &["update", "--memory", "64m", "nope"],
    ] {
        assert_fails(&host.run(args), "container \"nope\" does not exist");
    }
    // As runc, a forced delete of nothing succeeds.
    assert!(host.run(&["delete", "--force", "nope"]).status.success());
    assert_fails(&host.run(&["kill", "nope", "NOSUCH"]), "unknown signal");
    // runc's Go encoder prints an empty (nil) list as `null`.
    let list = host.run(&["list", "--format", "json"]);
    assert_eq!(common::text(&list.stdout).trim(), "null");
    host.assert_nothing_left();
}

#[test]
fn errors_go_to_the_log_file_as_json_lines() {
    let host = Host::new();
    let log = host.dir.path().join("log.json");
    // Single-dash long flags, as urfave/cli takes them.
    let out = host.run(&[
        "-log",
        log.to_str().unwrap(),
        "-log-format",
        "json",
        "state",
        "gone",
    ]);
    assert_fails(&out, "does not exist");
    let line = std::fs::read_to_string(&log).unwrap();
    let entry: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert_eq!(entry["level"], "error");
    assert_eq!(entry["msg"], "container \"gone\" does not exist");
    assert!(entry["time"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn help_names_every_command_and_features_is_json() {
    let host = Host::new();
    let help = common::text(&host.run(&["--help"]).stdout);
    for c in [
        "create", "start", "run", "state", "kill", "delete", "exec", "ps", "pause", "resume",
        "list", "events", "update", "spec", "features", "check", "env",
    ] {
        assert!(
            help.contains(&format!("\n  {c} ")),
            "{c} missing from help:\n{help}"
        );
    }
    let f = host.run(&["features"]);
    let f: serde_json::Value = serde_json::from_slice(&f.stdout).unwrap();
    assert_eq!(f["linux"]["cgroup"]["v2"], true);
    assert_eq!(
        f["hooks"],
        serde_json::json!([
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart",
            "poststop"
        ])
    );
}
