//! runc's lifecycle commands: create, start, run, state, kill, delete, pause, resume, list, ps.
//! Each is a thin layer over `runvm_sandbox::standalone`; the stand-in is started here because
//! it is this binary run again.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, ExitCode};

use anyhow::{Context, Result};
use runvm_sandbox::config::Config;
use runvm_sandbox::standalone::{self, HostProcess, StandaloneError};
use runvm_sandbox::ContainerId;

use crate::args::{CreateArgs, Format, Global};
use crate::standin::{self, StandinIo};

/// Runs `f` on a fresh async runtime.
pub fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    use tracing::Instrument;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(
            async {
                let result = f.await;
                // What the agents logged meanwhile, and the spans of this command's calls.
                runvm_sandbox::guest_telemetry::finish_all().await;
                result
            }
            .instrument(tracing::Span::current()),
        )
}

fn cid(id: &str) -> Result<ContainerId> {
    Ok(ContainerId::parse(id)?)
}

/// Creates the container and its stand-in; returns the stand-in and whether it has a terminal.
fn create_with_standin(
    global: &Global,
    config: &Config,
    a: &CreateArgs,
    foreground: bool,
) -> Result<(ContainerId, Child, bool)> {
    let id = cid(&a.id)?;
    let bundle = std::path::absolute(&a.bundle)
        .with_context(|| format!("bundle path {}", a.bundle.display()))?;
    // Read and checked once: the value goes on to the VM and the container.
    let loaded = standalone::check_bundle(config, &bundle, &id)?;
    let terminal = loaded.terminal();
    if terminal && !foreground && a.io.console_socket.is_none() {
        anyhow::bail!("cannot allocate tty if runvm will detach without setting console socket");
    }
    if !terminal && a.io.console_socket.is_some() {
        anyhow::bail!("cannot use console socket if runvm will not detach or allocate tty");
    }
    block_on(async {
        let (sb, streams) = standalone::create(config, &id, loaded).await?;
        let started = (|| {
            let io = match &a.io.console_socket {
                Some(socket) => standin::console(socket)?,
                None => StandinIo::Inherit,
            };
            let cgroup = sb.record().vm.config.cgroup_procs.clone();
            let handoff = standin::Handoff::Streams(streams.into_fds());
            let mut child =
                standin::spawn(global, config, &id, "", terminal, io, &cgroup, handoff)?.child;
            let recorded = HostProcess::of(child.id())
                .context("the stand-in process exited at once")
                .and_then(|p| Ok(standalone::set_standin(config, &id, p)?))
                .and_then(|()| match &a.io.pid_file {
                    Some(path) => standin::write_pid_file(path, child.id()),
                    None => Ok(()),
                });
            if let Err(e) = recorded {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
            Ok(child)
        })();
        match started {
            Ok(child) => {
                sb.detach();
                Ok((id, child, terminal))
            }
            Err(e) => {
                standalone::abort_container(config, sb, &id).await;
                Err(e)
            }
        }
    })
}

pub fn create(global: &Global, config: &Config, a: &CreateArgs) -> Result<ExitCode> {
    // The stand-in lives on after runvm exits (a caller that is a subreaper adopts it).
    create_with_standin(global, config, a, false)?;
    Ok(ExitCode::SUCCESS)
}

async fn start_container(config: &Config, id: &ContainerId) -> Result<()> {
    let (mut sb, st) = standalone::open(config, id)?;
    match st.status {
        "created" => Ok(sb.start_container(id).await?),
        "stopped" => Err(StandaloneError::StartStopped.into()),
        _ => Err(StandaloneError::AlreadyRunning.into()),
    }
}

pub fn start(config: &Config, id: &str) -> Result<ExitCode> {
    let id = cid(id)?;
    block_on(start_container(config, &id))?;
    Ok(ExitCode::SUCCESS)
}

/// `run`: create and start; in the foreground, wait and remove the container unless `keep`.
pub fn run(
    global: &Global,
    config: &Config,
    a: &CreateArgs,
    detach: bool,
    keep: bool,
) -> Result<ExitCode> {
    let (id, child, terminal) = create_with_standin(global, config, a, !detach)?;
    if let Err(e) = block_on(start_container(config, &id)) {
        let _ = block_on(async { Ok(standalone::delete(config, &id, true).await?) });
        return Err(e);
    }
    if detach {
        return Ok(ExitCode::SUCCESS);
    }
    let code = standin::wait_foreground(child, terminal && a.io.console_socket.is_none())?;
    if !keep {
        block_on(async { Ok(standalone::delete(config, &id, true).await?) })?;
    }
    Ok(ExitCode::from(code))
}

/// Go's RFC 3339 with nanoseconds (`time.RFC3339Nano`): the fraction without trailing zeros,
/// none at all when zero.
fn rfc3339_nano(text: &str) -> String {
    match text.split_once('.') {
        Some((secs, rest)) => {
            let (fraction, zone) = rest.split_at(
                rest.find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(rest.len()),
            );
            let fraction = fraction.trim_end_matches('0');
            if fraction.is_empty() {
                format!("{secs}{zone}")
            } else {
                format!("{secs}.{fraction}{zone}")
            }
        }
        None => text.to_string(),
    }
}

/// runc's `containerState`, which `state` and `list --format json` print: its fields in its
/// order, `annotations` left out when empty, `created` as Go prints it, an owner without a
/// name as `#UID`. (`reason` is runvm's, for an entry whose records cannot be used.)
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct RuncState<'a> {
    oci_version: &'a str,
    id: &'a str,
    pid: u32,
    status: &'a str,
    bundle: &'a Path,
    rootfs: &'a Path,
    created: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
    owner: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

fn runc_state(st: &standalone::OciState) -> RuncState<'_> {
    RuncState {
        oci_version: &st.oci_version,
        id: &st.id,
        pid: st.pid,
        status: st.status,
        bundle: &st.bundle,
        rootfs: &st.rootfs,
        created: rfc3339_nano(&st.created),
        annotations: &st.annotations,
        owner: owner_name(&st.owner),
        reason: st.reason.as_deref(),
    }
}

/// runc names an owner missing from /etc/passwd `#UID`.
fn owner_name(owner: &str) -> String {
    if !owner.is_empty() && owner.bytes().all(|b| b.is_ascii_digit()) {
        format!("#{owner}")
    } else {
        owner.to_string()
    }
}

pub fn state(config: &Config, id: &str) -> Result<ExitCode> {
    let st = standalone::state(config, &cid(id)?)?;
    println!("{}", serde_json::to_string_pretty(&runc_state(&st))?);
    Ok(ExitCode::SUCCESS)
}

/// A signal by name (`KILL`, `SIGKILL`, `kill`) or number; `0` checks that the container's
/// process is alive, as with kill(2).
pub fn parse_signal(text: &str) -> Result<i32> {
    if let Ok(n) = text.parse::<i32>() {
        if (0..=64).contains(&n) {
            return Ok(n);
        }
    }
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let number = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ILL" => libc::SIGILL,
        "TRAP" => libc::SIGTRAP,
        "ABRT" | "IOT" => libc::SIGABRT,
        "BUS" => libc::SIGBUS,
        "FPE" => libc::SIGFPE,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "SEGV" => libc::SIGSEGV,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "STKFLT" => libc::SIGSTKFLT,
        "CHLD" => libc::SIGCHLD,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "TTIN" => libc::SIGTTIN,
        "TTOU" => libc::SIGTTOU,
        "URG" => libc::SIGURG,
        "XCPU" => libc::SIGXCPU,
        "XFSZ" => libc::SIGXFSZ,
        "VTALRM" => libc::SIGVTALRM,
        "PROF" => libc::SIGPROF,
        "WINCH" => libc::SIGWINCH,
        "IO" | "POLL" => libc::SIGIO,
        "PWR" => libc::SIGPWR,
        "SYS" => libc::SIGSYS,
        _ => anyhow::bail!("unknown signal {text:?}"),
    };
    Ok(number)
}

pub fn kill(config: &Config, id: &str, signal: &str, all: bool) -> Result<ExitCode> {
    let id = cid(id)?;
    let signal = parse_signal(signal)?;
    block_on(async {
        let (mut sb, st) = standalone::open(config, &id)?;
        if st.status == "stopped" {
            return Err(StandaloneError::NotRunning.into());
        }
        Ok(sb.signal(&id, "", signal, all).await?)
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn delete(config: &Config, id: &str, force: bool) -> Result<ExitCode> {
    let id = cid(id)?;
    match block_on(async { Ok(standalone::delete(config, &id, force).await?) }) {
        Err(e)
            if force
                && matches!(
                    e.downcast_ref::<StandaloneError>(),
                    Some(StandaloneError::NotExist(_))
                ) =>
        {
            Ok(ExitCode::SUCCESS)
        }
        r => r.map(|()| ExitCode::SUCCESS),
    }
}

pub fn pause(config: &Config, id: &str, pause: bool) -> Result<ExitCode> {
    let id = cid(id)?;
    block_on(async {
        let (mut sb, st) = standalone::open(config, &id)?;
        match (pause, st.status) {
            (true, "running") => Ok(sb.pause_container(&id).await?),
            (true, _) => Err(StandaloneError::NotRunning.into()),
            (false, "paused") => Ok(sb.resume_container(&id).await?),
            (false, _) => Err(StandaloneError::NotPaused.into()),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn list(config: &Config, format: Format, quiet: bool) -> Result<ExitCode> {
    let states = standalone::list(config)?;
    if quiet {
        for s in &states {
            println!("{}", s.id);
        }
    } else if format == Format::Json {
        // Go's encoder: an empty list is `null`.
        let list: Vec<RuncState> = states.iter().map(runc_state).collect();
        if list.is_empty() {
            println!("null");
        } else {
            println!("{}", serde_json::to_string(&list)?);
        }
    } else {
        let rows: Vec<Vec<String>> = states
            .iter()
            .map(|s| {
                vec![
                    s.id.clone(),
                    s.pid.to_string(),
                    s.status.to_string(),
                    s.bundle.display().to_string(),
                    rfc3339_nano(&s.created),
                    owner_name(&s.owner),
                ]
            })
            .collect();
        let header = ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from);
        print!("{}", tabwriter(&header, &rows, 12));
        // The table has no column for why an entry is `unknown`: say it beside.
        for s in &states {
            if let Some(reason) = &s.reason {
                tracing::warn!(
                    container = %s.id,
                    %reason,
                    "unusable container; remove it with `runvm delete --force`"
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Go's `tabwriter.NewWriter(out, minwidth, 1, 3, ' ', 0)` as runc uses it: every column but
/// the last padded with spaces to the widest cell plus 3, at least `minwidth`; the last column
/// as it is.
fn tabwriter(header: &[String], rows: &[Vec<String>], minwidth: usize) -> String {
    let columns = header.len();
    let mut widths = vec![minwidth; columns];
    for row in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        for (w, cell) in widths.iter_mut().zip(row).take(columns - 1) {
            *w = (*w).max(cell.chars().count() + 3);
        }
    }
    let mut out = String::new();
    for row in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        for (i, cell) in row.iter().enumerate() {
            if i + 1 < columns {
                out.push_str(&format!("{cell:w$}", w = widths[i]));
            } else {
                out.push_str(cell);
            }
        }
        out.push('\n');
    }
    out
}

pub fn ps(config: &Config, id: &str, format: Format) -> Result<ExitCode> {
    let id = cid(id)?;
    let processes = block_on(async {
        let (mut sb, st) = standalone::open(config, &id)?;
        if st.status == "stopped" {
            return Err(StandaloneError::NotRunning.into());
        }
        Ok(sb.processes(&id).await?)
    })?;
    if format == Format::Json {
        let pids: Vec<i32> = processes.iter().map(|p| p.pid).collect();
        println!("{}", serde_json::to_string(&pids)?);
    } else {
        let now = runvm_sandbox::state::unix_now_ns();
        print!(
            "{}",
            crate::ps::table(&processes, now, crate::ps::host_user)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes runc's default config.json into `bundle`, refusing to overwrite one.
pub fn spec(bundle: &Path) -> Result<ExitCode> {
    let path = bundle.join("config.json");
    if path.exists() {
        anyhow::bail!("File {} exists. Remove it first", path.display());
    }
    let text = serde_json::to_string_pretty(&runvm_sandbox::container::bundle::default_spec(
        &["sh"],
        true,
    ))?;
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_zero_is_a_liveness_check() {
        assert_eq!(parse_signal("0").unwrap(), 0);
        assert_eq!(parse_signal("KILL").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("sigterm").unwrap(), libc::SIGTERM);
        assert!(parse_signal("65").is_err());
        assert!(parse_signal("-1").is_err());
    }

    #[test]
    fn times_are_printed_as_go_prints_them() {
        assert_eq!(
            rfc3339_nano("2024-05-01T10:00:00.120000000Z"),
            "2024-05-01T10:00:00.12Z"
        );
        assert_eq!(
            rfc3339_nano("2024-05-01T10:00:00.000000000Z"),
            "2024-05-01T10:00:00Z"
        );
        assert_eq!(owner_name("1234"), "#1234");
        assert_eq!(owner_name("root"), "root");
    }

    #[test]
    fn tables_are_aligned_as_gos_tabwriter() {
        let header = ["ID", "PID", "STATUS"].map(String::from);
        let rows = vec![vec![
            "a-very-long-id".to_string(),
            "7".into(),
            "running".into(),
        ]];
        assert_eq!(
            tabwriter(&header, &rows, 12),
            "ID               PID         STATUS\na-very-long-id   7           running\n"
        );
    }

    #[test]
    fn state_has_runcs_fields_in_runcs_order() {
        let st = standalone::OciState {
            oci_version: "1.0.2".into(),
            id: "c1".into(),
            status: "running",
            pid: 42,
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "2024-05-01T10:00:00.500000000Z".into(),
            annotations: Default::default(),
            owner: "root".into(),
            reason: None,
        };
        assert_eq!(
            serde_json::to_string(&runc_state(&st)).unwrap(),
            r#"{"ociVersion":"1.0.2","id":"c1","pid":42,"status":"running","bundle":"/b","rootfs":"/b/rootfs","created":"2024-05-01T10:00:00.5Z","owner":"root"}"#
        );
    }
}
