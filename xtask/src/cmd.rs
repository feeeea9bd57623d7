//! Running external commands, with errors that name the command and carry its stderr.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// How many trailing stderr lines of a streamed command go into its error.
const TAIL_LINES: usize = 40;

/// The command line of `cmd`, for messages (`prog arg1 arg2 (in DIR)`).
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    if let Some(dir) = cmd.get_current_dir() {
        text.push_str(&format!(" (in {})", dir.display()));
    }
    text
}

/// Runs `cmd` to completion with its output captured; fails, quoting its stderr, unless it
/// exits with status 0.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let what = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{what}`"))?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Like [`output`], returning stdout as text.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let what = describe(cmd);
    let out = output(cmd)?;
    String::from_utf8(out.stdout).with_context(|| format!("`{what}` printed non-UTF-8 output"))
}

/// Runs `cmd` with its stderr passed through to ours as it comes (for long builds), keeping the
/// last lines to quote in the error if it fails. Its stdout is inherited.
pub fn run_streamed(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{what}`"))?;
    let stderr = child
        .stderr
        .take()
        .with_context(|| format!("no stderr pipe for `{what}`"))?;
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    for line in BufReader::new(stderr).split(b'\n') {
        let line = line.with_context(|| format!("cannot read the stderr of `{what}`"))?;
        let line = String::from_utf8_lossy(&line).into_owned();
        eprintln!("{line}");
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for `{what}`"))?;
    if !status.success() {
        let tail: Vec<String> = tail.into();
        bail!(
            "`{what}` failed ({status}); its stderr ended with:\n{}",
            tail.join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failing_command_error_quotes_its_stderr() {
        let err = output(Command::new("sh").args(["-c", "echo boom-on-stderr >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("boom-on-stderr"), "{err}");
        assert!(err.contains("sh -c"), "{err}");
    }

    #[test]
    fn streamed_failing_command_error_quotes_its_stderr_tail() {
        let err =
            run_streamed(Command::new("sh").args(["-c", "echo first >&2; echo last >&2; exit 1"]))
                .unwrap_err()
                .to_string();
        assert!(err.contains("first\nlast"), "{err}");
    }

    #[test]
    fn stdout_returns_the_output_of_a_successful_command() {
        let text = stdout(Command::new("sh").args(["-c", "echo hello"])).unwrap();
        assert_eq!(text, "hello\n");
    }

    #[test]
    fn missing_program_error_names_it() {
        let err = output(&mut Command::new("runvm-no-such-program")).unwrap_err();
        assert!(format!("{err:#}").contains("runvm-no-such-program"));
    }
}
