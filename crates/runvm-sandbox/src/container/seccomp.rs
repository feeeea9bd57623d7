//! The spec's `linux.seccomp`, checked on the host before anything starts. The guest's
//! libcontainer loads the filter (with libseccomp) into every process of the container; the one
//! thing a VM cannot do is `SCMP_ACT_NOTIFY`: its listener (`listenerPath`) would be a socket on
//! the host, while the filter, the notification fd and the process live in the guest.

use std::path::Path;

use serde_json::Value;

use super::spec::SpecError;

/// The action runvm refuses, by name.
pub const NOTIFY: &str = "SCMP_ACT_NOTIFY";

fn notify_refused(file: &Path, json_path: String) -> SpecError {
    SpecError::Invalid {
        file: file.to_path_buf(),
        json_path,
        message: format!(
            "{NOTIFY} is not supported by runvm: the filter runs in the container's VM, where \
             no seccomp agent can be reached (listenerPath names a host socket); use another \
             action"
        ),
    }
}

/// Refuses a profile that uses `SCMP_ACT_NOTIFY` (as its default or for any syscall), naming
/// the JSON path of the first use. `file` is the spec's path, for the message.
pub fn check(file: &Path, spec: &Value) -> Result<(), SpecError> {
    let Some(seccomp) = spec.pointer("/linux/seccomp") else {
        return Ok(());
    };
    if seccomp.get("defaultAction").and_then(Value::as_str) == Some(NOTIFY) {
        return Err(notify_refused(file, "linux.seccomp.defaultAction".into()));
    }
    let syscalls = seccomp.get("syscalls").and_then(Value::as_array);
    for (i, rule) in syscalls.into_iter().flatten().enumerate() {
        if rule.get("action").and_then(Value::as_str) == Some(NOTIFY) {
            return Err(notify_refused(
                file,
                format!("linux.seccomp.syscalls[{i}].action"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn spec(seccomp: Value) -> Value {
        json!({"linux": {"seccomp": seccomp}})
    }

    #[test]
    fn every_action_but_notify_is_accepted() {
        let file = Path::new("/b/config.json");
        assert!(check(file, &json!({})).is_ok());
        for action in [
            "SCMP_ACT_ALLOW",
            "SCMP_ACT_ERRNO",
            "SCMP_ACT_KILL",
            "SCMP_ACT_KILL_PROCESS",
            "SCMP_ACT_KILL_THREAD",
            "SCMP_ACT_TRAP",
            "SCMP_ACT_TRACE",
            "SCMP_ACT_LOG",
        ] {
            let s = spec(json!({"defaultAction": action,
                "syscalls": [{"names": ["getcwd"], "action": action, "errnoRet": 1}]}));
            assert!(check(file, &s).is_ok(), "{action}");
        }
    }

    #[test]
    fn notify_is_refused_by_name_with_its_json_path() {
        let file = Path::new("/b/config.json");
        let s = spec(json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["chmod"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}
        ], "listenerPath": "/run/agent.sock"}));
        let err = check(file, &s).unwrap_err().to_string();
        assert!(
            err.starts_with("/b/config.json: linux.seccomp.syscalls[1].action: SCMP_ACT_NOTIFY"),
            "{err}"
        );
        let s = spec(json!({"defaultAction": "SCMP_ACT_NOTIFY"}));
        let err = check(file, &s).unwrap_err().to_string();
        assert!(
            err.contains("linux.seccomp.defaultAction: SCMP_ACT_NOTIFY is not supported"),
            "{err}"
        );
    }
}
