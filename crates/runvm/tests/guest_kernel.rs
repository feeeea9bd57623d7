//! The guest kernel carries what containers that manage networking need (runvm's kernel has
//! it built in): a privileged container creates bridges and iptables NAT REDIRECT rules,
//! through nf_tables (iptables-nft) and the legacy tables (iptables-legacy), in one VM boot.
//! The container runs the host's iptables, copied into its root with the libraries and
//! extensions it loads.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{spec, text, Host};
use serde_json::json;

/// Where Debian's iptables keeps its extensions (dlopened at run time).
const XTABLES_DIR: &str = "/usr/lib/x86_64-linux-gnu/xtables";
/// The host's iptables programs (one multi-call binary each), by the names they answer to.
const IPTABLES: &[(&str, &str)] = &[
    ("iptables-nft", "/usr/sbin/xtables-nft-multi"),
    ("iptables-legacy", "/usr/sbin/xtables-legacy-multi"),
];

/// The shared libraries `ldd` lists for `elf`, the dynamic loader included.
fn libraries(elf: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(elf).output().expect("run ldd");
    text(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Copies `file` to the same path under `rootfs` (following symbolic links).
fn copy_into(rootfs: &Path, file: &Path) {
    let target = rootfs.join(file.strip_prefix("/").unwrap());
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    std::fs::copy(file, &target).unwrap_or_else(|e| panic!("copy {}: {e}", file.display()));
}

/// Puts the host's iptables (nft and legacy) into `rootfs`: the programs, their extensions
/// and every library they link.
fn install_iptables(rootfs: &Path) {
    let mut elves: Vec<PathBuf> = IPTABLES.iter().map(|(_, p)| PathBuf::from(p)).collect();
    let extensions = std::fs::read_dir(XTABLES_DIR)
        .unwrap_or_else(|e| panic!("{XTABLES_DIR}: {e} (apt-get install iptables)"));
    elves.extend(extensions.flatten().map(|e| e.path()));
    let mut libs: Vec<PathBuf> = elves.iter().flat_map(|e| libraries(e)).collect();
    libs.sort();
    libs.dedup();
    for file in elves.iter().chain(&libs) {
        copy_into(rootfs, file);
    }
    for (name, program) in IPTABLES {
        std::os::unix::fs::symlink(program, rootfs.join("bin").join(name)).unwrap();
    }
}

#[test]
fn privileged_container_creates_bridges_and_iptables_nat_redirect_rules() {
    let host = Host::new();
    let script = "set -e
        ip link add br0 type bridge
        ip link set br0 up
        brctl addbr br1
        echo bridges: $(for b in /sys/class/net/*/bridge; do basename ${b%/bridge}; done)
        iptables-nft -t nat -A OUTPUT -p tcp --dport 80 -j REDIRECT --to-ports 8080
        echo nft:; iptables-nft -t nat -L OUTPUT -n
        iptables-legacy -t nat -A PREROUTING -p tcp --dport 80 -j REDIRECT --to-ports 8081
        echo legacy:; iptables-legacy -t nat -L PREROUTING -n
        head -n 1 /proc/net/ip_vs
        cat /proc/sys/net/bridge/bridge-nf-call-iptables";
    let mut config = spec(&["sh", "-c", script]);
    config["root"]["readonly"] = false.into();
    let caps = json!(["CAP_NET_ADMIN", "CAP_NET_RAW"]);
    for set in ["bounding", "effective", "permitted"] {
        config["process"]["capabilities"][set] = caps.clone();
    }
    let bundle = host.bundle("netadmin", &config);
    install_iptables(&bundle.join("rootfs"));

    let out = host.run(&["run", "--bundle", bundle.to_str().unwrap(), "netadmin"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let context = format!(
        "stdout:\n{stdout}\nstderr:\n{stderr}\n(the guest image must carry runvm's kernel: \
         cargo xtask guest)"
    );
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert!(stdout.contains("bridges: br0 br1\n"), "{context}");
    let (nft, legacy) = stdout.split_once("legacy:").expect(&context);
    assert!(
        nft.contains("tcp dpt:80 redir ports 8080"),
        "nft rule: {context}"
    );
    assert!(
        legacy.contains("tcp dpt:80 redir ports 8081"),
        "legacy rule: {context}"
    );
    assert!(stdout.contains("IP Virtual Server"), "IPVS: {context}");
    assert!(stdout.trim_end().ends_with('1'), "br_netfilter: {context}");
    host.assert_nothing_left();
}
