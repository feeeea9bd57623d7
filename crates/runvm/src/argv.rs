//! runc parses its flags with urfave/cli, which takes long flags with one dash as well as two
//! (`-root X`, `-log-format=json`). clap does not: such flags are rewritten to two dashes
//! before parsing. Only runvm's own long flag names are rewritten, and only up to the first
//! positional argument after the command (the container id), so a command given to `exec`
//! keeps its own flags untouched.

use std::ffi::OsString;

/// Long flags that take a value (the next argument, unless written `--flag=value`).
const VALUE_FLAGS: &[&str] = &[
    "root",
    "log",
    "log-format",
    "log-level",
    "config",
    "criu",
    "bundle",
    "pid-file",
    "console-socket",
    "preserve-fds",
    "format",
    "process",
    "env",
    "cwd",
    "user",
    "additional-gids",
    "apparmor",
    "process-label",
    "interval",
    "resources",
    "blkio-weight",
    "cpu-period",
    "cpu-quota",
    "cpu-share",
    "cpu-shares",
    "cpu-rt-period",
    "cpu-rt-runtime",
    "cpuset-cpus",
    "cpuset-mems",
    "memory",
    "memory-reservation",
    "memory-swap",
    "kernel-memory",
    "kernel-memory-tcp",
    "pids-limit",
    "l3-cache-schema",
    "mem-bw-schema",
];

/// Long flags without a value.
const BOOL_FLAGS: &[&str] = &[
    "debug",
    "systemd-cgroup",
    "rootless",
    "no-pivot",
    "no-new-keyring",
    "detach",
    "all",
    "force",
    "tty",
    "stats",
    "quiet",
    "help",
    "version",
];

/// Short flags that take a value.
const SHORT_VALUE_FLAGS: &[&str] = &["-b", "-f", "-p", "-e", "-u", "-g", "-r"];

/// Rewrites single-dash long flags to two dashes (see the module documentation).
pub fn normalize(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.into_iter();
    if let Some(program) = iter.next() {
        out.push(program);
    }
    let mut positionals = 0;
    let mut expect_value = false;
    for arg in iter.by_ref() {
        let Some(text) = arg.to_str().map(str::to_string) else {
            out.push(arg);
            expect_value = false;
            continue;
        };
        if expect_value {
            expect_value = false;
            out.push(arg);
            continue;
        }
        if text == "--" {
            out.push(arg);
            break;
        }
        let (name, has_value) = match text.strip_prefix("--").or_else(|| text.strip_prefix('-')) {
            Some(rest) => match rest.split_once('=') {
                Some((n, _)) => (n.to_string(), true),
                None => (rest.to_string(), false),
            },
            None => {
                positionals += 1;
                out.push(arg);
                // The command, then the container id: what follows may be a command's own flags.
                if positionals >= 2 {
                    break;
                }
                continue;
            }
        };
        let long = VALUE_FLAGS.contains(&name.as_str()) || BOOL_FLAGS.contains(&name.as_str());
        if long && !text.starts_with("--") {
            out.push(OsString::from(format!("-{text}")));
        } else {
            out.push(arg);
        }
        expect_value = !has_value
            && (VALUE_FLAGS.contains(&name.as_str()) && long
                || SHORT_VALUE_FLAGS.contains(&text.as_str()));
    }
    out.extend(iter);
    out
}

/// Whether the global flags (before the command) ask for the version: `-v`, `--version` (runc's)
/// or `-V`.
pub fn asks_version(argv: &[OsString]) -> bool {
    const WITH_VALUE: &[&str] = &[
        "--root",
        "--log",
        "--log-format",
        "--config",
        "--log-level",
        "--criu",
    ];
    let mut args = argv.iter().skip(1);
    while let Some(a) = args.next() {
        let Some(a) = a.to_str() else { return false };
        match a {
            "-v" | "--version" | "-V" => return true,
            _ if WITH_VALUE.contains(&a) => {
                args.next();
            }
            _ if a.starts_with('-') => {}
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        normalize(args.iter().map(OsString::from).collect())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn single_dash_long_flags_get_two() {
        assert_eq!(
            norm(&["runvm", "-root", "/r", "-log-format=json", "state", "x"]),
            ["runvm", "--root", "/r", "--log-format=json", "state", "x"]
        );
    }

    #[test]
    fn go_runc_invocations_are_kept() {
        let args = [
            "runvm",
            "--root",
            "/run/x",
            "--log",
            "/b/log.json",
            "--log-format",
            "json",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/b/init.pid",
            "--no-pivot",
            "id1",
        ];
        assert_eq!(norm(&args), args);
    }

    #[test]
    fn the_command_of_exec_is_untouched() {
        assert_eq!(
            norm(&["runvm", "exec", "-t", "c1", "ls", "-all", "-root"]),
            ["runvm", "exec", "-t", "c1", "ls", "-all", "-root"]
        );
        assert_eq!(
            norm(&["runvm", "exec", "-e", "A=1", "-cwd", "/", "c1", "-debug"]),
            ["runvm", "exec", "-e", "A=1", "--cwd", "/", "c1", "-debug"]
        );
    }

    #[test]
    fn version_is_asked_only_before_the_command() {
        let v = |args: &[&str]| asks_version(&args.iter().map(OsString::from).collect::<Vec<_>>());
        assert!(v(&["runvm", "--version"]));
        assert!(v(&["runvm", "-v"]));
        assert!(v(&["runvm", "--root", "/x", "-v"]));
        assert!(!v(&["runvm", "--root", "-v", "list"]));
        assert!(!v(&["runvm", "exec", "c1", "ls", "-v"]));
        assert!(!v(&["runvm", "list"]));
    }
}
