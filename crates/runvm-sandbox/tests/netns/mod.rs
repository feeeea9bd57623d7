//! Network namespaces made by the tests: a "pod" namespace whose devices are veths paired with
//! devices of a "peer" namespace (the host or bridge side). Addresses exist only inside them.
#![allow(dead_code)]

use std::process::Command;
use std::time::{Duration, Instant};

/// Runs `ip`/`tc`/... and returns stdout; panics naming the command and its stderr.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces joined by veth pairs; removed on drop.
pub struct Netns {
    pub pod: String,
    pub peer: String,
    /// Whether dropping this value removes the namespaces.
    owned: bool,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let n = Netns {
            pod: format!("rvt-pod-{tag}-{}", std::process::id()),
            peer: format!("rvt-peer-{tag}-{}", std::process::id()),
            owned: true,
        };
        for ns in [&n.pod, &n.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        n
    }

    /// `ip -n POD ARGS` (`args` split at whitespace).
    pub fn ip_pod(&self, args: &str) -> String {
        let mut a = vec!["ip", "-n", &self.pod];
        a.extend(args.split_whitespace());
        run(&a)
    }

    /// `ip -n PEER ARGS` (`args` split at whitespace).
    pub fn ip_peer(&self, args: &str) -> String {
        let mut a = vec!["ip", "-n", &self.peer];
        a.extend(args.split_whitespace());
        run(&a)
    }

    /// Runs CNI's bridge plugin (with host-local IPAM in `data_dir`) as containerd would, the
    /// peer namespace standing for the host: a bridge `rvtbr0` there with the gateway
    /// `SUBNET.1`, a veth `eth0` in the pod namespace. `command` is "ADD" or "DEL". Returns the
    /// plugin's answer.
    pub fn cni_bridge(&self, command: &str, subnet: &str, data_dir: &std::path::Path) -> String {
        let conf = serde_json::json!({
            "cniVersion": "1.0.0", "name": "rvt-net", "type": "bridge", "bridge": "rvtbr0",
            "isGateway": true, "ipMasq": false,
            "ipam": {
                "type": "host-local", "ranges": [[{"subnet": subnet}]],
                "routes": [{"dst": "0.0.0.0/0"}], "dataDir": data_dir,
            },
        });
        // Debian's containernetworking-plugins, or the upstream layout.
        let cni_dir = ["/usr/lib/cni", "/opt/cni/bin"]
            .into_iter()
            .find(|d| std::path::Path::new(d).join("bridge").exists())
            .expect("CNI plugins in /usr/lib/cni or /opt/cni/bin");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.peer, &format!("{cni_dir}/bridge")])
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.pod)
            .env("CNI_NETNS", format!("/run/netns/{}", self.pod))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", cni_dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(conf.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let answer = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "CNI bridge {command}: {answer} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        answer
    }

    /// The namespaces another value owns.
    pub fn borrowed(pod: String, peer: String) -> Netns {
        Netns {
            pod,
            peer,
            owned: false,
        }
    }

    /// `dev` in the pod (with `mac`, `addr`/24, `mtu`) paired with `peer_dev` (`gw`/24).
    pub fn veth(&self, dev: &str, mac: &str, addr: &str, peer_dev: &str, gw: &str, mtu: &str) {
        run(&[
            "ip", "-n", &self.pod, "link", "add", dev, "address", mac, "mtu", mtu, "type", "veth",
            "peer", "name", peer_dev, "netns", &self.peer,
        ]);
        run(&[
            "ip", "-n", &self.peer, "link", "set", peer_dev, "mtu", mtu, "up",
        ]);
        run(&[
            "ip",
            "-n",
            &self.peer,
            "addr",
            "add",
            &format!("{gw}/24"),
            "dev",
            peer_dev,
        ]);
        run(&[
            "ip",
            "-n",
            &self.pod,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            dev,
        ]);
        run(&["ip", "-n", &self.pod, "link", "set", dev, "up"]);
    }

    pub fn path(&self) -> std::path::PathBuf {
        format!("/run/netns/{}", self.pod).into()
    }

    /// Fetches `url` from the peer namespace, retrying up to `within`.
    pub fn fetch(&self, url: &str, within: Duration) -> Result<String, String> {
        let deadline = Instant::now() + within;
        loop {
            let out = Command::new("ip")
                .args([
                    "netns", "exec", &self.peer, "wget", "-q", "-T", "3", "-O", "-", url,
                ])
                .output()
                .unwrap();
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
            }
            if Instant::now() >= deadline {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The pod namespace's devices and qdiscs, for leak checks.
    pub fn runvm_leftovers(&self) -> Vec<String> {
        let links = run(&["ip", "-n", &self.pod, "-o", "link", "show"]);
        let qdiscs = run(&["ip", "netns", "exec", &self.pod, "tc", "qdisc", "show"]);
        let filters = run(&[
            "ip", "netns", "exec", &self.pod, "tc", "filter", "show", "dev", "eth0", "ingress",
        ]);
        links
            .lines()
            .filter(|l| l.contains("_runvm"))
            .chain(qdiscs.lines().filter(|l| l.contains("ingress")))
            .chain(filters.lines().filter(|l| !l.trim().is_empty()))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        for ns in [&self.pod, &self.peer] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}
