//! The host half of port forwarding in the pod's network namespace: a listener on the
//! namespace's `127.0.0.1` and one iptables rule that sends every TCP connection made to
//! `127.0.0.1` inside that namespace (containerd's `PortForward` dials `localhost:PORT` there)
//! to it:
//!
//! ```text
//! iptables -t nat -A OUTPUT -o lo -d 127.0.0.1/32 -p tcp \
//!     -m comment --comment runvm-portfwd:SANDBOX -j REDIRECT --to-ports LISTENER
//! ```
//!
//! `OUTPUT` only sees connections made from inside the namespace, and `-o lo -d 127.0.0.1`
//! only loopback ones: nothing is opened on the pod's other addresses or on the host's. The
//! forwarder learns the port asked for from `SO_ORIGINAL_DST` (see `crate::portfwd`). The rule
//! is recorded ([`PortForwardRule`], in the pod network's record) before it is made, and removed
//! with the pod network; it also goes with the namespace.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::host::in_netns;
use super::NetworkError;

/// Where the iptables program is looked for, before `$PATH`.
const IPTABLES_PATHS: [&str; 3] = ["/usr/sbin/iptables", "/sbin/iptables", "/usr/bin/iptables"];
/// How long iptables may wait for the xtables lock, seconds.
const XTABLES_WAIT_SECS: &str = "5";

/// The REDIRECT rule runvm made in a pod's network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForwardRule {
    /// The iptables program that made it (removed with the same one).
    pub iptables: PathBuf,
    /// The forwarder's port on the namespace's 127.0.0.1.
    pub listen_port: u16,
    /// The rule's comment: `runvm-portfwd:SANDBOX`.
    pub comment: String,
}

impl PortForwardRule {
    /// The rule for `sandbox`'s forwarder listening on `listen_port`.
    pub fn new(iptables: PathBuf, sandbox: &str, listen_port: u16) -> PortForwardRule {
        PortForwardRule {
            iptables,
            listen_port,
            comment: format!("runvm-portfwd:{sandbox}"),
        }
    }

    /// The iptables arguments that append (`-A`), check (`-C`) or delete (`-D`) the rule.
    pub fn args(&self, op: &str) -> Vec<String> {
        [
            "-w",
            XTABLES_WAIT_SECS,
            "-t",
            "nat",
            op,
            "OUTPUT",
            "-o",
            "lo",
            "-d",
            "127.0.0.1/32",
            "-p",
            "tcp",
            "-m",
            "comment",
            "--comment",
            &self.comment,
            "-j",
            "REDIRECT",
            "--to-ports",
            &self.listen_port.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// The iptables program: the usual places, then `$PATH`.
pub fn find_iptables() -> Result<PathBuf, NetworkError> {
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    IPTABLES_PATHS
        .iter()
        .map(PathBuf::from)
        .chain(path_dirs.into_iter().map(|d| d.join("iptables")))
        .find(|p| p.is_file())
        .ok_or_else(|| NetworkError::PortForward {
            action: "find iptables".into(),
            reason: format!(
                "no iptables program in {} or $PATH (install the iptables package)",
                IPTABLES_PATHS.join(", ")
            ),
        })
}

fn pf_error(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> NetworkError {
    let action = action.into();
    move |e| NetworkError::PortForward {
        action,
        reason: e.to_string(),
    }
}

/// Binds the forwarder's listener on `127.0.0.1` (a free port) inside `netns`.
pub async fn bind_listener(netns: &Path) -> Result<std::net::TcpListener, NetworkError> {
    let shown = netns.display().to_string();
    in_netns(netns, move || async move {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(pf_error(format!(
            "listen on 127.0.0.1 in network namespace {shown} (is its loopback up?)"
        )))?;
        listener
            .set_nonblocking(true)
            .map_err(pf_error("make the port-forward listener non-blocking"))?;
        Ok(listener)
    })
    .await
}

/// Runs iptables with `args` inside the namespace's thread; the exit code and stderr.
fn run_iptables(rule: &PortForwardRule, op: &str) -> Result<(Option<i32>, String), NetworkError> {
    let out = Command::new(&rule.iptables)
        .args(rule.args(op))
        .output()
        .map_err(pf_error(format!("run {}", rule.iptables.display())))?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

/// Adds `rule` to `netns`.
pub async fn add_rule(netns: &Path, rule: &PortForwardRule) -> Result<(), NetworkError> {
    let rule = rule.clone();
    let shown = netns.display().to_string();
    in_netns(netns, move || async move {
        match run_iptables(&rule, "-A")? {
            (Some(0), _) => Ok(()),
            (code, stderr) => Err(NetworkError::PortForward {
                action: format!(
                    "add the port-forward rule in network namespace {shown} with {}",
                    rule.iptables.display()
                ),
                reason: format!("exit {code:?}: {stderr}"),
            }),
        }
    })
    .await
}

/// Removes `rule` from `netns`: a rule (or namespace) already gone is fine.
pub async fn remove_rule(netns: &Path, rule: &PortForwardRule) -> Result<(), NetworkError> {
    if !netns.exists() {
        tracing::debug!(netns = %netns.display(), "namespace gone; so is the port-forward rule");
        return Ok(());
    }
    let rule = rule.clone();
    let shown = netns.display().to_string();
    in_netns(netns, move || async move {
        let (code, stderr) = run_iptables(&rule, "-D")?;
        if code == Some(0) {
            return Ok(());
        }
        // iptables -C exits 1 when the rule does not exist.
        match run_iptables(&rule, "-C")? {
            (Some(1), _) => Ok(()),
            _ => Err(NetworkError::PortForward {
                action: format!("remove the port-forward rule in network namespace {shown}"),
                reason: format!("exit {code:?}: {stderr}"),
            }),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_catches_only_loopback_tcp_made_in_the_namespace() {
        let rule = PortForwardRule::new("/usr/sbin/iptables".into(), "pod1", 40123);
        assert_eq!(
            rule.args("-A").join(" "),
            "-w 5 -t nat -A OUTPUT -o lo -d 127.0.0.1/32 -p tcp -m comment \
             --comment runvm-portfwd:pod1 -j REDIRECT --to-ports 40123"
        );
        // Deleting names the very same rule.
        let add = rule.args("-A");
        let del = rule.args("-D");
        assert_eq!(add.len(), del.len());
        let differ: Vec<_> = add.iter().zip(&del).filter(|(a, d)| a != d).collect();
        assert_eq!(differ, [(&"-A".to_string(), &"-D".to_string())]);
    }

    #[test]
    fn rule_record_round_trips() {
        let rule = PortForwardRule::new("/sbin/iptables".into(), "p", 1);
        let json = serde_json::to_string(&rule).unwrap();
        assert_eq!(
            serde_json::from_str::<PortForwardRule>(&json).unwrap(),
            rule
        );
    }
}
