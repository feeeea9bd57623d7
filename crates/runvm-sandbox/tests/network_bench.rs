//! Network benchmark: the same container (busybox httpd serving a 100 MB file from a tmpfs) in
//! the same veth set-up, under runc and in a runvm VM (tcfilter and macvtap models), measured in
//! the same run from the veth's other end: download throughput (MB/s, host to container) and
//! ICMP round-trip latency. Prints a table.
//!
//! Not part of the normal test run (it takes a minute); run it with
//! `cargo test -p runvm-sandbox --test network_bench -- --ignored --nocapture`.
//! Needs root, runc, busybox and wget on the host, and the guest image.

mod common;
mod netns;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use netns::{run, Netns};
use runvm_sandbox::container::bundle::default_spec;
use runvm_sandbox::network::NetworkModel;
use runvm_sandbox::sandbox::create_qemu_sandbox_in;
use runvm_sandbox::SandboxId;
use serde_json::{json, Value};

const FILE_MB: u64 = 100;
const PINGS: &str = "50";

/// The container: a 100 MB file in a tmpfs, served by httpd on port 80.
fn web_spec(ns: &Netns) -> Value {
    let script = format!(
        "dd if=/dev/zero of=/www/big bs=1M count={FILE_MB} 2>/dev/null && \
         echo ok > /www/ok && exec httpd -f -p 80 -h /www"
    );
    let mut spec = default_spec(&["sh", "-c", &script], false);
    spec["linux"]["namespaces"][1] = json!({"type": "network", "path": ns.path()});
    spec["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/www", "type": "tmpfs", "source": "tmpfs",
        "options": ["nosuid", "nodev", "mode=755", "size=200m"]
    }));
    spec
}

#[derive(Debug)]
struct Figures {
    mb_per_s: f64,
    rtt_min_ms: f64,
    rtt_avg_ms: f64,
    rtt_max_ms: f64,
}

/// Downloads the big file from the peer namespace (after the server answers) and pings.
fn measure(ns: &Netns, ip: &str) -> Figures {
    ns.fetch(&format!("http://{ip}/ok"), Duration::from_secs(60))
        .expect("server up");
    let t = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.peer, "wget", "-q", "-O", "/dev/null"])
        .arg(format!("http://{ip}/big"))
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ping = run(&[
        "ip", "netns", "exec", &ns.peer, "busybox", "ping", "-q", "-A", "-c", PINGS, ip,
    ]);
    // "round-trip min/avg/max = 0.054/0.070/0.120 ms"
    let line = ping
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .unwrap_or_else(|| panic!("no summary in {ping}"));
    let nums: Vec<f64> = line
        .split('=')
        .nth(1)
        .unwrap()
        .trim()
        .trim_end_matches(" ms")
        .split('/')
        .map(|v| v.trim().parse().unwrap())
        .collect();
    Figures {
        mb_per_s: FILE_MB as f64 * 1_048_576.0 / 1e6 / secs,
        rtt_min_ms: nums[0],
        rtt_avg_ms: nums[1],
        rtt_max_ms: nums[2],
    }
}

fn runc_figures(host: &Host, ns: &Netns) -> Figures {
    let bundle = host.bundle("runc-web", &web_spec(ns));
    let root = host.dir.path().join("runc-root");
    let id = format!("rvbench-{}", std::process::id());
    // The container inherits runc's stdio with -d: a file, so nothing waits on a pipe.
    let log = host.dir.path().join("runc.log");
    let runc = |args: &[&str]| {
        let out = std::fs::File::create(&log).unwrap();
        let status = Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .status()
            .unwrap();
        (status, std::fs::read_to_string(&log).unwrap_or_default())
    };
    let bundle_arg = bundle.to_str().unwrap();
    let (status, text) = runc(&["run", "-d", "--bundle", bundle_arg, &id]);
    assert!(status.success(), "runc run: {text}");
    let figures = std::panic::catch_unwind(|| measure(ns, "10.210.0.2"));
    runc(&["delete", "--force", &id]);
    figures.unwrap_or_else(|e| std::panic::resume_unwind(e))
}

async fn runvm_figures(host: &Host, ns: &Netns, model: NetworkModel) -> Figures {
    let id = SandboxId::parse(&format!("netbench-{}", model.as_str())).unwrap();
    let mut config = host.config.clone();
    config.network.model = model;
    let (mut sb, report) = create_qemu_sandbox_in(&config, id, BTreeMap::new(), Some(ns.path()))
        .await
        .expect("boot");
    eprintln!("runvm VM: {:?}", report.accelerator);
    let _web = create(
        &mut sb,
        "web",
        host.bundle(&format!("vm-web-{}", model.as_str()), &web_spec(ns)),
        stdio(false, false),
    )
    .await;
    sb.start_container(&cid("web")).await.unwrap();
    let ns_peer = ns.peer.clone();
    let ns_pod = ns.pod.clone();
    let figures = tokio::task::spawn_blocking(move || {
        let ns = Netns::borrowed(ns_pod, ns_peer);
        measure(&ns, "10.210.0.2")
    })
    .await;
    sb.stop().await.unwrap();
    sb.delete(false).await.unwrap();
    figures.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn network_throughput_and_latency_runc_vs_runvm() {
    let host = Host::new();
    let ns = Netns::new("bench");
    ns.veth(
        "eth0",
        "02:00:0a:d2:00:02",
        "10.210.0.2",
        "vpeer0",
        "10.210.0.1",
        "1500",
    );
    run(&[
        "ip",
        "-n",
        &ns.pod,
        "route",
        "add",
        "default",
        "via",
        "10.210.0.1",
    ]);

    let runc = runc_figures(&host, &ns);
    let tcfilter = runvm_figures(&host, &ns, NetworkModel::Tcfilter).await;
    let macvtap = runvm_figures(&host, &ns, NetworkModel::Macvtap).await;
    assert!(
        ns.runvm_leftovers().is_empty(),
        "{:?}",
        ns.runvm_leftovers()
    );
    host.assert_nothing_left();

    println!();
    println!(
        "pod network, same veth set-up, peer namespace -> container ({FILE_MB} MB download, \
         {PINGS} pings)"
    );
    println!(
        "{:<28} {:>10} {:>12} {:>12} {:>12}",
        "runtime", "MB/s", "rtt min ms", "rtt avg ms", "rtt max ms"
    );
    for (name, f) in [
        ("runc", &runc),
        ("runvm (tcfilter)", &tcfilter),
        ("runvm (macvtap)", &macvtap),
    ] {
        println!(
            "{:<28} {:>10.1} {:>12.3} {:>12.3} {:>12.3}",
            name, f.mb_per_s, f.rtt_min_ms, f.rtt_avg_ms, f.rtt_max_ms
        );
    }
}
