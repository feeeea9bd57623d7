//! `runvm network` through the binary: a container created by `runvm run -d` from a bundle
//! whose spec names the pod's network namespace (as containerd writes it, set up by CNI's
//! bridge plugin) is reachable at its pod IP from the bridge side; interfaces and routes are listed, an interface is hot-added and removed,
//! a bad route is refused by name; `delete` leaves nothing in the namespace.
//!
//! Needs root, iproute2, the host set-up and the guest image; `make test` provides them.

mod common;
#[path = "../../runvm-sandbox/tests/netns/mod.rs"]
mod netns;

use std::time::Duration;

use common::*;
use netns::Netns;
use serde_json::{json, Value};

fn json_out(host: &Host, args: &[&str]) -> Value {
    let out = host.run(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&out.stdout)))
}

#[test]
fn network_verbs_through_the_binary() {
    let host = Host::new();
    let ns = Netns::new("cli");
    // The pod's eth0 as containerd's CNI set-up makes it: bridge plugin, host-local IPAM, the
    // peer namespace standing for the host (bridge rvtbr0, gateway 10.220.0.1).
    let ipam = host.dir.path().join("cni-ipam");
    let answer = ns.cni_bridge("ADD", "10.220.0.0/24", &ipam);
    let answer: Value = serde_json::from_str(&answer).unwrap();
    let pod_ip = answer["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no pod IP in {answer}"))
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let pod_mac = answer["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["sandbox"].is_string())
        .unwrap_or_else(|| panic!("no pod interface in {answer}"))["mac"]
        .as_str()
        .unwrap()
        .to_owned();
    let pod_url = format!("http://{pod_ip}/");

    let script = "mkdir -p /tmp/w && echo cli-ok > /tmp/w/index.html && \
                  exec httpd -f -p 80 -h /tmp/w";
    let mut s = spec(&["sh", "-c", script]);
    s["root"]["readonly"] = json!(false);
    s["linux"]["namespaces"][1] = json!({"type": "network", "path": ns.path()});
    let b = host.bundle("web", &s);
    let (code, _, err) = host.run_to_files(
        &["run", "-d", "--bundle", b.to_str().unwrap(), "netc"],
        "run",
    );
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(err).unwrap());
    let page = ns
        .fetch(&pod_url, Duration::from_secs(30))
        .expect("pod IP reachable from the host side through the VM");
    assert_eq!(page.trim(), "cli-ok");

    let list = json_out(&host, &["network", "list", "netc"]);
    let eth0 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "eth0")
        .unwrap_or_else(|| panic!("{list}"))
        .clone();
    assert_eq!(eth0["mac"], pod_mac.as_str());
    assert_eq!(eth0["addresses"], json!([format!("{pod_ip}/24")]));
    let routes = json_out(&host, &["network", "routes", "netc"]);
    assert!(
        routes
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["destination"].is_null() && r["gateway"] == "10.220.0.1"),
        "{routes}"
    );

    // Hot-add a second device, reach the container through it, remove it.
    ns.veth(
        "eth1",
        "02:00:0a:dd:00:02",
        "10.221.0.2",
        "vpeer1",
        "10.221.0.1",
        "1500",
    );
    let added = json_out(&host, &["network", "add", "netc", r#"{"device": "eth1"}"#]);
    assert_eq!(added["addresses"], json!(["10.221.0.2/24"]), "{added}");
    let page = ns
        .fetch("http://10.221.0.2/", Duration::from_secs(30))
        .expect("page through eth1");
    assert_eq!(page.trim(), "cli-ok");
    let out = host.run(&["network", "remove", "netc", "eth1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = json_out(&host, &["network", "list", "netc"]);
    assert!(!list.to_string().contains("eth1"), "{list}");

    // Bad input is refused by name; the table stays.
    let bad = r#"[{"destination": "10.9.0.0/16", "device": "nosuch0"}]"#;
    assert_fails(
        &host.run(&["network", "routes", "netc", "--replace", bad]),
        "nosuch0",
    );
    assert_fails(
        &host.run(&["network", "add", "netc", r#"{"device": "nosuch1"}"#]),
        "nosuch1",
    );
    assert_eq!(json_out(&host, &["network", "routes", "netc"]), routes);

    let del = host.run(&["delete", "--force", "netc"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    let left = ns.runvm_leftovers();
    assert!(left.is_empty(), "left in the pod namespace: {left:#?}");
    host.assert_nothing_left();
    // The pod's network is CNI's again, and CNI removes it.
    ns.cni_bridge("DEL", "10.220.0.0/24", &ipam);
}
