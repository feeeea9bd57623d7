//! createContainer hooks from the container's root file system.
//!
//! libcontainer runs `createContainer` hooks in the container's namespaces before `pivot_root`,
//! resolving their paths in the mount namespace it came from: in a VM that is the guest's
//! initramfs, which holds nothing but the agent. So each such hook is rewritten to run the agent
//! itself with [`HOOK_ARG`], which enters the container's root file system (`chroot`, still
//! before `pivot_root`: it is mounted at the spec's `root.path`) and execs the hook's program
//! there, with the hook's arguments and environment (libcontainer sets them, and the state on
//! stdin, on the agent's process; `exec` keeps them). The hook's program, its libraries and
//! interpreter therefore come from the image, as for `startContainer` hooks.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// The hidden first argument that makes the agent a createContainer hook's launcher:
/// `runvm-agent __hook_in_root ROOTFS PATH [ARG0 ARGS...]`.
pub const HOOK_ARG: &str = "__hook_in_root";

/// `spec` with each `createContainer` hook run by `agent` (this program) inside the
/// container's root file system.
pub fn create_hooks_from_rootfs(mut spec: Spec, agent: &Path) -> Spec {
    let Some(root) = spec.root().as_ref().map(|r| r.path().clone()) else {
        return spec;
    };
    let Some(hooks) = spec.hooks_mut().as_mut() else {
        return spec;
    };
    let Some(create) = hooks.create_container_mut().as_mut() else {
        return spec;
    };
    for hook in create.iter_mut() {
        let path = hook.path().clone();
        // arg0 is the hook's own path: libcontainer (patched) names a failed hook by it.
        let mut args = vec![
            path.display().to_string(),
            HOOK_ARG.to_string(),
            root.display().to_string(),
            path.display().to_string(),
        ];
        match hook.args() {
            Some(original) if !original.is_empty() => args.extend(original.iter().cloned()),
            _ => args.push(path.display().to_string()),
        }
        hook.set_path(agent.to_path_buf());
        hook.set_args(Some(args));
    }
    spec
}

/// The launcher: `args` are ROOTFS, PATH, then the hook's argv. Never returns; exit status 127
/// with the reason on stderr (which libcontainer reports with the hook) when the program cannot
/// be started.
pub fn main(mut args: impl Iterator<Item = OsString>) -> ! {
    let (Some(root), Some(path)) = (args.next(), args.next()) else {
        eprintln!("runvm-agent: {HOOK_ARG} is for the agent's own use (ROOTFS PATH ARGS...)");
        std::process::exit(2);
    };
    let argv: Vec<OsString> = args.collect();
    let fail = |what: &str, e: &dyn std::fmt::Display| -> ! {
        eprintln!(
            "createContainer hook {}: {what}: {e}",
            Path::new(&path).display()
        );
        std::process::exit(127);
    };
    let root = PathBuf::from(root);
    if let Err(e) = nix::unistd::chroot(&root) {
        fail(
            &format!("entering the root file system {}", root.display()),
            &e,
        );
    }
    if let Err(e) = nix::unistd::chdir("/") {
        fail("changing to /", &e);
    }
    let to_c = |s: &OsString| CString::new(s.as_bytes());
    let program = match to_c(&path) {
        Ok(p) => p,
        Err(e) => fail("its path", &e),
    };
    let argv: Vec<CString> = match argv.iter().map(to_c).collect() {
        Ok(a) => a,
        Err(e) => fail("its arguments", &e),
    };
    // execv keeps the environment libcontainer gave this process: the hook's own.
    let e = match nix::unistd::execv(&program, &argv) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    fail("cannot run it from the container's root file system", &e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_container_hooks_run_through_the_agent_in_the_rootfs_and_others_stay() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "/run/runvm/shared/c1/rootfs"},
            "hooks": {
                "createContainer": [
                    {"path": "/bin/sh", "args": ["sh", "-c", "true"], "env": ["A=1"], "timeout": 5},
                    {"path": "/usr/bin/hook"}
                ],
                "startContainer": [{"path": "/bin/true"}]
            }
        }))
        .unwrap();
        let spec = create_hooks_from_rootfs(spec, Path::new("/init"));
        let hooks = spec.hooks().as_ref().unwrap();
        let create = hooks.create_container().as_ref().unwrap();
        assert_eq!(create[0].path(), Path::new("/init"));
        assert_eq!(
            create[0].args().as_ref().unwrap(),
            &[
                "/bin/sh",
                HOOK_ARG,
                "/run/runvm/shared/c1/rootfs",
                "/bin/sh",
                "sh",
                "-c",
                "true"
            ]
        );
        assert_eq!(create[0].env().as_ref().unwrap(), &["A=1"]);
        assert_eq!(create[0].timeout(), Some(5));
        assert_eq!(
            create[1].args().as_ref().unwrap()[3..],
            ["/usr/bin/hook", "/usr/bin/hook"]
        );
        let start = hooks.start_container().as_ref().unwrap();
        assert_eq!(start[0].path(), Path::new("/bin/true"));
    }
}
