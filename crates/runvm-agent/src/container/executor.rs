//! How a container's process is started: libcontainer's last step, replaced so that it behaves as
//! runc's does. libcontainer's default executor refuses any process without `PATH` in its
//! environment, even one whose `args[0]` is an absolute path, and searches the `PATH` of the
//! process running it. runc looks `args[0]` up as Go's `exec.LookPath` does: a name with a slash
//! is used as it is (relative to the process's cwd), any other name is searched in the `PATH` of
//! the process's own environment; a missing or unusable executable is an error naming it, reported
//! at create (or exec) time, before the process waits for start.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::fcntl::AtFlags;
use nix::unistd::AccessFlags;

/// Why a process's executable cannot be run. The messages are runc's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The spec's process has no `args`.
    #[error("the process has no args")]
    NoArgs,
    /// A name without a slash is in no folder of the process's `PATH` (or it has none).
    #[error("exec: {name:?}: executable file not found in $PATH")]
    NotInPath {
        /// `args[0]`.
        name: String,
    },
    /// The named file cannot be executed.
    #[error("exec: {name:?}: {path}: {reason}", path = path.display())]
    Unusable {
        /// `args[0]`.
        name: String,
        /// The file found for it.
        path: PathBuf,
        /// Why (no such file, a directory, permission denied, ...).
        reason: String,
    },
}

/// Finds the file `name` (a process's `args[0]`) names, for a process whose environment is `env`,
/// as runc does. `usable` says why a candidate cannot be executed, if it cannot.
pub fn lookup_with(
    name: &str,
    env: &[String],
    usable: impl Fn(&Path) -> Result<(), String>,
) -> Result<PathBuf, LookupError> {
    if name.is_empty() {
        return Err(LookupError::NotInPath { name: name.into() });
    }
    if name.contains('/') {
        let path = PathBuf::from(name);
        return match usable(&path) {
            Ok(()) => Ok(path),
            Err(reason) => Err(LookupError::Unusable {
                name: name.into(),
                path,
                reason,
            }),
        };
    }
    // As with Go's os.Setenv, the last PATH given wins. No PATH: nothing to search.
    let search = env.iter().rev().find_map(|e| e.strip_prefix("PATH="));
    for dir in search.into_iter().flat_map(|p| p.split(':')) {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(name);
        if usable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(LookupError::NotInPath { name: name.into() })
}

/// Whether `path` can be executed by this process: an existing file (not a folder) with an
/// execute bit that `faccessat(X_OK, AT_EACCESS)` accepts (so not on a `noexec` mount).
pub fn executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "no such file or directory".to_string(),
        _ => e.to_string(),
    })?;
    if meta.is_dir() {
        return Err("is a directory".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("permission denied".into());
    }
    nix::unistd::faccessat(None, path, AccessFlags::X_OK, AtFlags::AT_EACCESS)
        .map_err(|e| e.desc().to_lowercase())
}

/// The executable of the spec's process, looked up in the filesystem it sees.
pub fn lookup(spec: &Spec) -> Result<(PathBuf, Vec<String>), LookupError> {
    let process = spec.process().as_ref();
    let args = process
        .and_then(|p| p.args().clone())
        .filter(|a| !a.is_empty())
        .ok_or(LookupError::NoArgs)?;
    let env = process.and_then(|p| p.env().clone()).unwrap_or_default();
    let path = lookup_with(&args[0], &env, executable)?;
    Ok((path, args))
}

/// libcontainer's executor for runvm's containers and exec'd processes: runc's lookup of
/// `args[0]`, then `execv` with the environment libcontainer set up from the spec.
#[derive(Debug, Clone, Copy, Default)]
pub struct RuncExecutor;

impl Executor for RuncExecutor {
    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        lookup(spec)
            .map(|_| ())
            .map_err(|e| ExecutorValidationError::ArgValidationError(e.to_string()))
    }

    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let (path, args) = lookup(spec).map_err(|e| ExecutorError::Other(e.to_string()))?;
        let cstring = |s: &[u8]| {
            CString::new(s).map_err(|_| ExecutorError::Other(format!("exec: {s:?}: NUL in text")))
        };
        let file = cstring(path.as_os_str().as_bytes())?;
        let argv = args
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        // Only returns on failure.
        let err = match nix::unistd::execv(&file, &argv) {
            Err(e) => e,
            Ok(never) => match never {},
        };
        Err(ExecutorError::Other(format!(
            "exec: {:?}: {}",
            args[0],
            err.desc().to_lowercase()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(path: Option<&str>) -> Vec<String> {
        let mut env = vec!["TERM=xterm".to_string()];
        if let Some(p) = path {
            env.push(format!("PATH={p}"));
        }
        env
    }

    /// A usable() that knows only `files`.
    fn only(files: &'static [&'static str]) -> impl Fn(&Path) -> Result<(), String> {
        move |p: &Path| {
            if files.iter().any(|f| Path::new(f) == p) {
                Ok(())
            } else {
                Err("no such file or directory".into())
            }
        }
    }

    #[test]
    fn an_absolute_executable_runs_without_path_in_the_environment() {
        let found = lookup_with("/bin/app", &env(None), only(&["/bin/app"])).unwrap();
        assert_eq!(found, Path::new("/bin/app"));
    }

    #[test]
    fn a_bare_name_is_searched_in_the_process_path_in_order() {
        let found = lookup_with(
            "app",
            &env(Some("/usr/local/bin:/usr/bin:/bin")),
            only(&["/bin/app", "/usr/bin/app"]),
        )
        .unwrap();
        assert_eq!(found, Path::new("/usr/bin/app"));
    }

    #[test]
    fn a_bare_name_without_path_is_not_found_and_named() {
        let err = lookup_with("app", &env(None), only(&["/bin/app"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "exec: \"app\": executable file not found in $PATH"
        );
    }

    #[test]
    fn the_last_path_in_the_environment_wins() {
        let mut e = env(Some("/nowhere"));
        e.push("PATH=/opt/bin".into());
        let found = lookup_with("app", &e, only(&["/opt/bin/app"])).unwrap();
        assert_eq!(found, Path::new("/opt/bin/app"));
    }

    #[test]
    fn an_empty_path_entry_means_the_working_directory() {
        let found = lookup_with("app", &env(Some("/bin:")), only(&["./app"])).unwrap();
        assert_eq!(found, Path::new("./app"));
    }

    #[test]
    fn a_missing_path_with_a_slash_is_named_with_the_reason() {
        let err = lookup_with("/bin/nope", &env(Some("/bin")), only(&[])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "exec: \"/bin/nope\": /bin/nope: no such file or directory"
        );
    }

    #[test]
    fn files_that_cannot_be_executed_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "x").unwrap();
        assert_eq!(executable(&plain), Err("permission denied".into()));
        assert_eq!(executable(dir.path()), Err("is a directory".into()));
        assert_eq!(
            executable(&dir.path().join("missing")),
            Err("no such file or directory".into())
        );
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(executable(&script), Ok(()));
    }

    #[test]
    fn a_spec_without_args_is_refused() {
        let mut spec = Spec::default();
        if let Some(p) = spec.process_mut() {
            p.set_args(Some(vec![]));
        }
        assert_eq!(lookup(&spec).unwrap_err(), LookupError::NoArgs);
    }
}
