//! Pod networking through a real VM: network namespaces made by the test (addresses only
//! inside them), a pod veth whose other end is in a "peer" namespace standing for the host or
//! bridge side. One VM serves every check (boots are expensive under TCG).
//!
//! Needs root, iproute2, the host set-up and the guest image; `make test` provides them.

mod common;
mod netns;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use netns::{run, Netns};
use runvm_sandbox::agent::{Interface, IpNet, Route};
use runvm_sandbox::container::bundle::default_spec;
use runvm_sandbox::network::AddInterface;
use runvm_sandbox::sandbox::create_qemu_sandbox_in;
use runvm_sandbox::{Sandbox, SandboxError, SandboxId};

/// Starts container "web": busybox httpd on port 80 serving `text`, in the pod's network
/// namespace named by path, as containerd writes it (in the guest: the VM's network).
async fn start_web(
    sb: &mut Sandbox,
    host: &Host,
    ns: &Netns,
    text: &str,
) -> runvm_sandbox::process::Streams {
    let script = format!(
        "mkdir -p /tmp/www && echo {text} > /tmp/www/index.html && exec httpd -f -p 80 -h /tmp/www"
    );
    let mut spec = default_spec(&["sh", "-c", &script], false);
    spec["root"]["readonly"] = serde_json::json!(false);
    spec["linux"]["namespaces"][1] = serde_json::json!({"type": "network", "path": ns.path()});
    let io = create(sb, "web", host.bundle("web", &spec), stdio(false, false)).await;
    sb.start_container(&cid("web")).await.unwrap();
    io
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_network_through_the_vm() {
    let host = Host::new();
    let ns = Netns::new("a");
    ns.veth(
        "eth0",
        "02:00:0a:c8:00:02",
        "10.200.0.2",
        "vpeer0",
        "10.200.0.1",
        "1400",
    );
    ns.ip_pod("route add default via 10.200.0.1");
    // Dual stack, as CNI may set it up.
    ns.ip_pod("addr add fd00:200::2/64 dev eth0 nodad");
    ns.ip_peer("addr add fd00:200::1/64 dev vpeer0 nodad");

    let id = SandboxId::parse("net").unwrap();
    let (mut sb, _) =
        create_qemu_sandbox_in(&host.config, id.clone(), BTreeMap::new(), Some(ns.path()))
            .await
            .expect("boot");

    // runvm's tap and the redirects in the pod's namespace.
    let leftovers = ns.runvm_leftovers();
    assert!(
        leftovers.iter().any(|l| l.contains("tap0_runvm")),
        "{leftovers:#?}"
    );
    let filters = run(&[
        "ip", "netns", "exec", &ns.pod, "tc", "filter", "show", "dev", "eth0", "ingress",
    ]);
    assert!(
        filters.contains("mirred") && filters.contains("tap0_runvm"),
        "{filters}"
    );

    // The guest has the device as the pod's namespace has it.
    let ifaces = sb.list_interfaces().await.unwrap();
    let eth0 = ifaces
        .iter()
        .find(|i| i.name == "eth0")
        .unwrap_or_else(|| panic!("no eth0 in the guest: {ifaces:#?}"));
    assert_eq!(eth0.mac, "02:00:0a:c8:00:02");
    assert_eq!(eth0.mtu, 1400);
    assert_eq!(
        eth0.addresses,
        [net("10.200.0.2/24"), net("fd00:200::2/64")]
    );
    assert!(eth0.up);
    let routes = sb.list_routes().await.unwrap();
    let default = Route {
        destination: None,
        gateway: Some("10.200.0.1".parse().unwrap()),
        device: "eth0".into(),
        source: None,
        scope: 0,
        metric: 0,
    };
    assert!(routes.contains(&default), "{routes:#?}");
    let v6: Vec<&Route> = routes
        .iter()
        .filter(|r| r.destination == Some(net("fd00:200::/64")))
        .collect();
    assert!(
        v6.len() == 1 && v6[0].device == "eth0" && v6[0].metric == 256,
        "one IPv6 prefix route, with the namespace's metric: {routes:#?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r.destination == Some(net("10.200.0.0/24")) && r.device == "eth0"),
        "{routes:#?}"
    );

    // A container serves a page; the peer fetches it through the VM.
    let _web = start_web(&mut sb, &host, &ns, "hello-from-runvm").await;
    let page = ns.fetch("http://10.200.0.2/", Duration::from_secs(20));
    if page.is_err() {
        for cmd in [
            vec!["ip", "-n", &ns.pod, "-s", "link"],
            vec![
                "ip", "netns", "exec", &ns.pod, "tc", "-s", "filter", "show", "dev", "eth0",
                "ingress",
            ],
            vec![
                "ip",
                "netns",
                "exec",
                &ns.pod,
                "tc",
                "-s",
                "filter",
                "show",
                "dev",
                "tap0_runvm",
                "ingress",
            ],
            vec!["ip", "-n", &ns.peer, "neigh"],
            vec![
                "ip",
                "netns",
                "exec",
                &ns.peer,
                "ping",
                "-c",
                "2",
                "10.200.0.2",
            ],
        ] {
            let o = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
            eprintln!(
                "$ {cmd:?}\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    let page = page.expect("page through the VM");
    assert_eq!(page.trim(), "hello-from-runvm");
    let page = ns
        .fetch("http://[fd00:200::2]/", Duration::from_secs(20))
        .expect("page over IPv6");
    assert_eq!(page.trim(), "hello-from-runvm");

    // The container reaches its gateway (an httpd in the peer namespace).
    let peer_www = host.dir.path().join("peer-www");
    std::fs::create_dir_all(&peer_www).unwrap();
    std::fs::write(peer_www.join("index.html"), "hello-from-peer\n").unwrap();
    let mut peer_httpd = Command::new("ip")
        .args([
            "netns", "exec", &ns.peer, "busybox", "httpd", "-f", "-p", "8080", "-h",
        ])
        .arg(&peer_www)
        .spawn()
        .unwrap();
    let mut got = String::new();
    for attempt in 0..10 {
        let exec = exec_req(
            &format!("wget{attempt}"),
            // busybox 1.35's static wget crashes with -q or -T in the guest: plain flags only.
            &["wget", "-O", "-", "http://10.200.0.1:8080/"],
            false,
        );
        let io = common::exec(&mut sb, "web", exec).await;
        let (out, err) = outputs(io).await;
        got = String::from_utf8_lossy(&out).into_owned();
        let code = sb.wait(&cid("web"), &format!("wget{attempt}")).await;
        if !got.contains("hello-from-peer") {
            eprintln!(
                "wget from the container: {} {code:?}",
                String::from_utf8_lossy(&err)
            );
        }
        if got.contains("hello-from-peer") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _ = peer_httpd.kill();
    let _ = peer_httpd.wait();
    assert_eq!(got.trim(), "hello-from-peer", "container to gateway");

    // Bad input: an address the kernel refuses, a route to an unknown device. Clear errors;
    // the pod keeps its working network.
    let bad = Interface {
        addresses: vec![net("10.200.0.2/24"), net("::1/128")],
        ..eth0.clone()
    };
    let e = sb.update_interface(&bad).await.unwrap_err().to_string();
    assert!(e.contains("::1/128"), "{e}");
    let mut bad_routes = routes.clone();
    bad_routes.push(Route {
        destination: Some(net("10.99.0.0/16")),
        gateway: None,
        device: "nosuch0".into(),
        source: None,
        scope: 253,
        metric: 0,
    });
    let e = sb.update_routes(&bad_routes).await.unwrap_err().to_string();
    assert!(e.contains("nosuch0"), "{e}");
    assert_eq!(sb.list_routes().await.unwrap(), routes, "routes changed");
    let now = sb.list_interfaces().await.unwrap();
    assert!(now.contains(eth0), "{now:#?}");
    ns.fetch("http://10.200.0.2/", Duration::from_secs(10))
        .expect("page after the bad requests");

    // Hot-add a second device, reach the container through it, remove it.
    ns.veth(
        "eth1",
        "02:00:0a:c9:00:02",
        "10.201.0.2",
        "vpeer1",
        "10.201.0.1",
        "1500",
    );
    // A hot-add the guest cannot apply is undone: no card, tap or qdisc stays.
    let before = sb.list_interfaces().await.unwrap();
    let e = sb
        .add_interface(&AddInterface {
            device: "eth1".into(),
            addresses: Some(vec![net("::1/128")]),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("::1/128"), "{e}");
    let links = ns.ip_pod("-o link show");
    assert!(!links.contains("tap1_runvm"), "{links}");
    let qdiscs = run(&[
        "ip", "netns", "exec", &ns.pod, "tc", "qdisc", "show", "dev", "eth1",
    ]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    assert_eq!(sb.list_interfaces().await.unwrap(), before);
    let added = sb
        .add_interface(&AddInterface {
            device: "eth1".into(),
            ..Default::default()
        })
        .await
        .expect("hot-add eth1");
    assert_eq!(added.mac, "02:00:0a:c9:00:02");
    assert_eq!(added.addresses, [net("10.201.0.2/24")]);
    let page = ns
        .fetch("http://10.201.0.2/", Duration::from_secs(20))
        .expect("page through the hot-added card");
    assert_eq!(page.trim(), "hello-from-runvm");
    sb.remove_interface("eth1").await.expect("hot-remove eth1");
    let ifaces = sb.list_interfaces().await.unwrap();
    assert!(!ifaces.iter().any(|i| i.name == "eth1"), "{ifaces:#?}");
    let links = run(&["ip", "-n", &ns.pod, "-o", "link", "show"]);
    assert!(!links.contains("tap1_runvm"), "{links}");
    let qdiscs = run(&[
        "ip", "netns", "exec", &ns.pod, "tc", "qdisc", "show", "dev", "eth1",
    ]);
    assert!(!qdiscs.contains("ingress"), "{qdiscs}");
    ns.fetch("http://10.200.0.2/", Duration::from_secs(10))
        .expect("eth0 still works after the removal");

    // An unknown device is refused by name.
    let e = sb
        .add_interface(&AddInterface {
            device: "nosuch1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e, SandboxError::Network(_)) && e.to_string().contains("nosuch1"),
        "{e}"
    );

    // After delete: nothing runvm made is left in the namespace, nor anything else.
    sb.stop().await.unwrap();
    sb.delete(false).await.unwrap();
    let leftovers = ns.runvm_leftovers();
    assert!(
        leftovers.is_empty(),
        "left in the pod namespace: {leftovers:#?}"
    );
    host.assert_nothing_left();
}

/// The macvtap model: the pod's device given to a passthru macvtap, its /dev/tapN open in QEMU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_network_through_a_macvtap() {
    let mut host = Host::new();
    host.config.network.model = runvm_sandbox::network::NetworkModel::Macvtap;
    let ns = Netns::new("m");
    ns.veth(
        "eth0",
        "02:00:0a:ca:00:02",
        "10.202.0.2",
        "vpeer0",
        "10.202.0.1",
        "1500",
    );
    ns.ip_pod("route add default via 10.202.0.1");
    let id = SandboxId::parse("mvt").unwrap();
    let (mut sb, _) =
        create_qemu_sandbox_in(&host.config, id.clone(), BTreeMap::new(), Some(ns.path()))
            .await
            .expect("boot");
    let links = ns.ip_pod("-o link show");
    assert!(links.contains("mvt0_runvm"), "{links}");
    let ifaces = sb.list_interfaces().await.unwrap();
    assert!(
        ifaces
            .iter()
            .any(|i| i.name == "eth0" && i.mac == "02:00:0a:ca:00:02"),
        "{ifaces:#?}"
    );

    let _web = start_web(&mut sb, &host, &ns, "hello-macvtap").await;
    let page = ns
        .fetch("http://10.202.0.2/", Duration::from_secs(20))
        .expect("page through the macvtap");
    assert_eq!(page.trim(), "hello-macvtap");
    // Hot-add through a macvtap (its descriptor goes to QEMU over QMP), reach it, remove it;
    // then one that stays, for the VM's death below.
    ns.veth(
        "eth1",
        "02:00:0a:cb:00:02",
        "10.203.0.2",
        "vpeer1",
        "10.203.0.1",
        "1500",
    );
    let eth1 = AddInterface {
        device: "eth1".into(),
        ..Default::default()
    };
    let added = sb.add_interface(&eth1).await.expect("hot-add eth1");
    assert_eq!(added.mac, "02:00:0a:cb:00:02");
    let page = ns
        .fetch("http://10.203.0.2/", Duration::from_secs(20))
        .expect("page through the hot-added macvtap");
    assert_eq!(page.trim(), "hello-macvtap");
    assert!(ns.ip_pod("-o link show").contains("mvt1_runvm"));
    sb.remove_interface("eth1").await.expect("hot-remove eth1");
    let links = ns.ip_pod("-o link show");
    assert!(!links.contains("mvt1_runvm"), "{links}");
    sb.add_interface(&eth1).await.expect("hot-add eth1 again");

    // The VM dies: the monitor notices and removes the macvtap with the rest.
    let qemu = sb.pids().into_iter().find(|p| p.name == "qemu").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(qemu.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let failure = sb.monitor(Duration::from_millis(200)).await.unwrap();
    assert!(failure.to_string().contains("qemu"), "{failure}");
    let leftovers = ns.runvm_leftovers();
    assert!(
        leftovers.is_empty(),
        "left after the VM died: {leftovers:#?}"
    );
    sb.delete(false).await.unwrap();
    let leftovers = ns.runvm_leftovers();
    assert!(
        leftovers.is_empty(),
        "left in the pod namespace: {leftovers:#?}"
    );
    host.assert_nothing_left();
}
