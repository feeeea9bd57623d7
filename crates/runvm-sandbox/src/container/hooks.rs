//! OCI hooks, run where each can run for a container in a VM.
//!
//! - `createRuntime` and `prestart` run on the host, in the runtime's namespaces (in the pod's
//!   network namespace when the spec names one, as runc runs prestart), once the VM and the pod
//!   network exist and the container is created in the guest, before its process starts. A
//!   failure fails `create` and undoes it.
//! - `createContainer` and `startContainer` travel to the guest in the spec: libcontainer runs
//!   them there, in the container's namespaces.
//! - `poststart` runs on the host after the process started, `poststop` after the container was
//!   deleted; their failures are warnings.
//!
//! Each hook gets the container's state JSON on stdin, its `args` (the first is argv\[0\]),
//! `env` (only those variables) and `timeout` (seconds; the hook is killed past it). The state's
//! `pid` is QEMU's: the VM is the container's process on the host, and it lives in the pod's
//! network namespace, which is what hooks look up through `/proc/PID/ns/net`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// At most this much of a hook's output is kept for its error message.
const OUTPUT_KEPT: usize = 4096;

/// The stages at which hooks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `createRuntime`: on the host, after the container was created.
    CreateRuntime,
    /// `prestart` (deprecated in the spec, still used by Docker and NVIDIA): as createRuntime.
    Prestart,
    /// `poststart`: on the host, after the process started.
    Poststart,
    /// `poststop`: on the host, after the container was deleted.
    Poststop,
}

impl Stage {
    /// The spec's name of the stage.
    pub fn name(self) -> &'static str {
        match self {
            Stage::CreateRuntime => "createRuntime",
            Stage::Prestart => "prestart",
            Stage::Poststart => "poststart",
            Stage::Poststop => "poststop",
        }
    }

    /// The OCI status the state given to the hook shows.
    fn status(self) -> &'static str {
        match self {
            Stage::CreateRuntime | Stage::Prestart => "creating",
            Stage::Poststart => "running",
            Stage::Poststop => "stopped",
        }
    }
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The hook could not be started.
    #[error("{stage} hook {}: cannot run it", path.display())]
    Spawn {
        /// The stage.
        stage: &'static str,
        /// The hook's program.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The hook exited unsuccessfully or was killed.
    #[error("{stage} hook {} failed ({status}){}", path.display(), if output.is_empty() { String::new() } else { format!(": {output}") })]
    Failed {
        /// The stage.
        stage: &'static str,
        /// The hook's program.
        path: PathBuf,
        /// Its exit status.
        status: String,
        /// The end of what it wrote.
        output: String,
    },
    /// The hook ran past its timeout and was killed.
    #[error("{stage} hook {} did not finish within its timeout of {timeout} s; killed", path.display())]
    Timeout {
        /// The stage.
        stage: &'static str,
        /// The hook's program.
        path: PathBuf,
        /// The timeout, seconds.
        timeout: u64,
    },
}

/// A hook of the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// The program (absolute).
    pub path: PathBuf,
    /// Its argv (argv\[0\] first); empty: the path alone.
    pub args: Vec<String>,
    /// Its whole environment (`KEY=value`).
    pub env: Vec<String>,
    /// Seconds before it is killed.
    pub timeout: Option<u64>,
}

/// The hooks the host runs, by stage, as the spec lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostHooks {
    /// `createRuntime`.
    pub create_runtime: Vec<Hook>,
    /// `prestart`.
    pub prestart: Vec<Hook>,
    /// `poststart`.
    pub poststart: Vec<Hook>,
    /// `poststop`.
    pub poststop: Vec<Hook>,
}

impl HostHooks {
    /// The hooks of `stage`.
    pub fn of(&self, stage: Stage) -> &[Hook] {
        match stage {
            Stage::CreateRuntime => &self.create_runtime,
            Stage::Prestart => &self.prestart,
            Stage::Poststart => &self.poststart,
            Stage::Poststop => &self.poststop,
        }
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.create_runtime.is_empty()
            && self.prestart.is_empty()
            && self.poststart.is_empty()
            && self.poststop.is_empty()
    }
}

/// The host's hooks of `spec` (the `hooks` object, validated by `spec::prepare`); a problem is
/// named by its JSON path.
pub fn host_hooks(spec: &Value) -> Result<HostHooks, (String, String)> {
    let mut out = HostHooks::default();
    let Some(hooks) = spec.get("hooks") else {
        return Ok(out);
    };
    if hooks.is_null() {
        return Ok(out);
    }
    let Some(obj) = hooks.as_object() else {
        return Err(("hooks".into(), "must be an object".into()));
    };
    for (name, list) in [
        ("createRuntime", &mut out.create_runtime),
        ("prestart", &mut out.prestart),
        ("poststart", &mut out.poststart),
        ("poststop", &mut out.poststop),
    ] {
        if let Some(v) = obj.get(name) {
            *list = parse_list(&format!("hooks.{name}"), v)?;
        }
    }
    for name in ["createContainer", "startContainer"] {
        if let Some(v) = obj.get(name) {
            parse_list(&format!("hooks.{name}"), v)?;
        }
    }
    Ok(out)
}

fn parse_list(at: &str, v: &Value) -> Result<Vec<Hook>, (String, String)> {
    if v.is_null() {
        return Ok(Vec::new());
    }
    let Some(items) = v.as_array() else {
        return Err((at.into(), "must be a list of hooks".into()));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, h)| parse_hook(&format!("{at}[{i}]"), h))
        .collect()
}

fn strings(at: &str, v: Option<&Value>) -> Result<Vec<String>, (String, String)> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| (format!("{at}[{i}]"), "must be a string".into()))
            })
            .collect(),
        Some(_) => Err((at.into(), "must be a list of strings".into())),
    }
}

fn parse_hook(at: &str, h: &Value) -> Result<Hook, (String, String)> {
    let path = h
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| (format!("{at}.path"), "required: the hook's program".into()))?;
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err((
            format!("{at}.path"),
            format!("{path:?} is not absolute (the spec requires an absolute path)"),
        ));
    }
    let args = strings(&format!("{at}.args"), h.get("args"))?;
    let env = strings(&format!("{at}.env"), h.get("env"))?;
    let timeout = match h.get("timeout") {
        None | Some(Value::Null) => None,
        Some(t) => match t.as_u64() {
            Some(t) if (1..=86_400).contains(&t) => Some(t),
            _ => {
                return Err((
                    format!("{at}.timeout"),
                    format!("{t} is not valid: 1 to 86400 seconds"),
                ))
            }
        },
    };
    Ok(Hook {
        path,
        args,
        env,
        timeout,
    })
}

/// The state JSON a hook of `stage` gets on stdin.
pub fn state_json(
    stage: Stage,
    id: &str,
    pid: u32,
    bundle: &Path,
    annotations: &std::collections::BTreeMap<String, String>,
) -> Value {
    serde_json::json!({
        "ociVersion": crate::standalone::OCI_VERSION,
        "id": id,
        "status": stage.status(),
        "pid": pid,
        "bundle": bundle,
        "annotations": annotations,
    })
}

/// Runs the hooks of `stage` in order, each with `state` on stdin, in network namespace
/// `netns` when given; the first failure stops the rest and is returned.
pub async fn run(
    stage: Stage,
    hooks: &[Hook],
    state: &Value,
    netns: Option<&Path>,
) -> Result<(), HookError> {
    for hook in hooks {
        run_one(stage, hook, state, netns).await?;
    }
    Ok(())
}

/// Runs the hooks of `stage` whose failure is only a warning (poststart, poststop).
pub async fn run_warn(stage: Stage, hooks: &[Hook], state: &Value, netns: Option<&Path>) {
    for hook in hooks {
        if let Err(e) = run_one(stage, hook, state, netns).await {
            tracing::warn!(error = %e, "hook failed");
        }
    }
}

async fn run_one(
    stage: Stage,
    hook: &Hook,
    state: &Value,
    netns: Option<&Path>,
) -> Result<(), HookError> {
    let stage_name = stage.name();
    let spawn_error = |source| HookError::Spawn {
        stage: stage_name,
        path: hook.path.clone(),
        source,
    };
    let mut cmd = tokio::process::Command::new(&hook.path);
    if let Some((argv0, rest)) = hook.args.split_first() {
        use std::os::unix::process::CommandExt;
        cmd.as_std_mut().arg0(argv0);
        cmd.args(rest);
    }
    cmd.env_clear();
    for kv in &hook.env {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let netns_file = match netns {
        Some(p) => Some(std::fs::File::open(p).map_err(spawn_error)?),
        None => None,
    };
    if let Some(file) = &netns_file {
        let fd = file.as_raw_fd();
        // SAFETY: the closure runs in the child between fork and exec and calls only setns(2),
        // which is async-signal-safe; `fd` stays open until `spawn` returns (`netns_file`
        // outlives it).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().map_err(spawn_error)?;
    drop(netns_file);
    tracing::debug!(stage = stage_name, path = %hook.path.display(), "running hook");
    let input = serde_json::to_vec(state).unwrap_or_default();
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let work = async {
        if let Some(mut s) = stdin.take() {
            // A hook that does not read its stdin is fine.
            let _ = s.write_all(&input).await;
        }
        let mut out = Vec::new();
        let mut err = Vec::new();
        let read_out = async {
            if let Some(s) = stdout.as_mut() {
                let _ = s.take(1 << 20).read_to_end(&mut out).await;
            }
        };
        let read_err = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.take(1 << 20).read_to_end(&mut err).await;
            }
        };
        tokio::join!(read_out, read_err);
        let status = child.wait().await;
        (status, out, err)
    };
    let (status, out, err) = match hook.timeout {
        Some(secs) => match tokio::time::timeout(Duration::from_secs(secs), work).await {
            Ok(done) => done,
            Err(_) => {
                return Err(HookError::Timeout {
                    stage: stage_name,
                    path: hook.path.clone(),
                    timeout: secs,
                })
            }
        },
        None => work.await,
    };
    let status = status.map_err(spawn_error)?;
    if status.success() {
        return Ok(());
    }
    let mut output = String::from_utf8_lossy(&err).trim().to_string();
    if output.is_empty() {
        output = String::from_utf8_lossy(&out).trim().to_string();
    }
    if output.len() > OUTPUT_KEPT {
        let cut = output.len() - OUTPUT_KEPT;
        let cut = (cut..output.len())
            .find(|i| output.is_char_boundary(*i))
            .unwrap_or(output.len());
        output = output[cut..].to_string();
    }
    Err(HookError::Failed {
        stage: stage_name,
        path: hook.path.clone(),
        status: status.to_string(),
        output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn hook(script: &str, timeout: Option<u64>) -> Hook {
        Hook {
            path: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["HOOK_VAR=set".into()],
            timeout,
        }
    }

    #[tokio::test]
    async fn a_hook_gets_the_state_args_and_env_and_its_failure_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("state.json");
        let state = state_json(
            Stage::Prestart,
            "c1",
            42,
            Path::new("/b"),
            &BTreeMap::from([("a".to_string(), "b".to_string())]),
        );
        let script = format!(
            "cat > {}; echo \"$HOOK_VAR $0\" >> {}.env",
            out.display(),
            out.display()
        );
        run(Stage::Prestart, &[hook(&script, Some(5))], &state, None)
            .await
            .unwrap();
        let got: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(got["id"], "c1");
        assert_eq!(got["pid"], 42);
        assert_eq!(got["status"], "creating");
        assert_eq!(got["annotations"]["a"], "b");
        let env = std::fs::read_to_string(format!("{}.env", out.display())).unwrap();
        assert_eq!(env, "set sh\n");

        let err = run(
            Stage::Prestart,
            &[hook("echo broken >&2; exit 3", None)],
            &state,
            None,
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("prestart hook /bin/sh failed")
                && text.contains("exit status: 3")
                && text.contains("broken"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_hook_past_its_timeout_is_killed_and_named() {
        let state = Value::Null;
        let started = std::time::Instant::now();
        let err = run(
            Stage::CreateRuntime,
            &[hook("sleep 30", Some(1))],
            &state,
            None,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, HookError::Timeout { timeout: 1, .. }),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn bad_hooks_are_named_by_json_path() {
        let spec = serde_json::json!({"hooks": {"prestart": [{"path": "relative/x"}]}});
        let (at, why) = host_hooks(&spec).unwrap_err();
        assert_eq!(at, "hooks.prestart[0].path");
        assert!(why.contains("not absolute"), "{why}");
        let spec = serde_json::json!({"hooks": {"poststop": [{"path": "/x", "timeout": 0}]}});
        assert_eq!(
            host_hooks(&spec).unwrap_err().0,
            "hooks.poststop[0].timeout"
        );
        let spec = serde_json::json!({"hooks": {"startContainer": [{"args": []}]}});
        assert_eq!(
            host_hooks(&spec).unwrap_err().0,
            "hooks.startContainer[0].path"
        );
        let spec = serde_json::json!({"hooks": {
            "createRuntime": [{"path": "/a"}],
            "prestart": [{"path": "/b", "args": ["b", "x"], "env": ["K=V"], "timeout": 3}],
            "createContainer": [{"path": "/c"}]
        }});
        let h = host_hooks(&spec).unwrap();
        assert_eq!(h.create_runtime.len(), 1);
        assert_eq!(h.prestart[0].args, ["b", "x"]);
        assert_eq!(h.prestart[0].timeout, Some(3));
        assert!(h.poststart.is_empty() && h.poststop.is_empty());
    }
}
