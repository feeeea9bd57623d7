//! The benchmarks that drive the `runvm` and `runc` command lines: cold start, exec latency,
//! stdout throughput, and idle pods (memory, density).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use super::procs::{self, timed, Memory};
use super::stats::mb_per_sec;
use crate::cmd::describe;

/// The runtime a CLI benchmark drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Runvm,
    Runc,
}

/// A runtime's binary with a private state root, and a folder for the logs of its commands.
#[derive(Debug, Clone)]
pub struct Cli {
    pub runtime: Runtime,
    /// `runvm` or `runc`.
    pub program: PathBuf,
    /// The `--root` of every command.
    pub root: PathBuf,
    /// runvm's configuration file (RUNVM_CONFIG).
    pub config: PathBuf,
    /// Where the commands' stdout and stderr go.
    pub logs: PathBuf,
}

impl Cli {
    /// A command of this runtime, with its root.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg("--root").arg(&self.root);
        if self.runtime == Runtime::Runvm {
            cmd.env("RUNVM_CONFIG", &self.config)
                .env_remove("RUST_LOG")
                .args(["--log-level", "warn"]);
        }
        cmd.args(args);
        cmd
    }

    /// The same runtime with its root and logs in `dir` (so that the processes naming `dir`
    /// are this step's alone).
    pub fn within(&self, dir: &Path) -> Result<Cli> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
        Ok(Cli {
            root: dir.join("state"),
            logs,
            ..self.clone()
        })
    }

    /// `run` of `bundle` in the foreground as `id`; the time until it exits.
    pub fn run(&self, bundle: &Path, id: &str) -> Result<Duration> {
        let mut guard = Container::new(self, id);
        let mut cmd = self.cmd(&["run", "--bundle", path_str(bundle)?, id]);
        let took = timed(&mut cmd, &self.logs, id)?;
        guard.deleted();
        Ok(took)
    }

    /// `run -d` of `bundle` as `id`: a container running in the background, deleted on drop.
    pub fn run_detached(&self, bundle: &Path, id: &str) -> Result<Container<'_>> {
        let guard = Container::new(self, id);
        let mut cmd = self.cmd(&["run", "-d", "--bundle", path_str(bundle)?, id]);
        timed(&mut cmd, &self.logs, id)?;
        Ok(guard)
    }

    /// `exec ID true`; the time until it exits.
    pub fn exec_true(&self, id: &str, n: u32) -> Result<Duration> {
        let mut cmd = self.cmd(&["exec", id, "true"]);
        timed(&mut cmd, &self.logs, &format!("{id}-exec-{n}"))
    }

    /// `run` of `bundle` (whose process writes `expect` bytes to stdout) with stdout read by
    /// this process and thrown away: MB/s from the first byte read to the last.
    pub fn stdout_throughput(&self, bundle: &Path, id: &str, expect: u64) -> Result<f64> {
        let r = self.run_reading(bundle, id)?;
        ensure!(
            r.bytes == expect,
            "read {} bytes from the container's stdout, expected {expect}",
            r.bytes
        );
        let first = r.first.context("no output")?;
        Ok(mb_per_sec(r.bytes, (r.last - first).as_secs_f64()))
    }

    /// `run` of `bundle` (whose process writes something to stdout): the time from the start
    /// of `run` to the first byte of the container's output.
    pub fn first_output(&self, bundle: &Path, id: &str) -> Result<Duration> {
        let r = self.run_reading(bundle, id)?;
        let first = r.first.context("the container wrote nothing to stdout")?;
        Ok(first - r.started)
    }

    /// `run` of `bundle` in the foreground as `id`, its stdout read (and thrown away) by a
    /// thread of this process, which notes when bytes came.
    fn run_reading(&self, bundle: &Path, id: &str) -> Result<Reading> {
        let mut guard = Container::new(self, id);
        let mut cmd = self.cmd(&["run", "--bundle", path_str(bundle)?, id]);
        let what = describe(&cmd);
        let err = self.logs.join(format!("{id}.err"));
        let started = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err)?)
            .spawn()
            .with_context(|| format!("cannot run `{what}`"))?;
        let mut stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads to the end: the pipe closes when runvm and the stand-in are gone (on a failure,
        // when the guard's `delete -f` ends the stand-in).
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut r = Reading {
                started,
                first: None,
                last: started,
                bytes: 0,
            };
            let outcome = loop {
                match stdout.read(&mut buf) {
                    Ok(0) => break Ok(r),
                    Ok(n) => {
                        r.last = Instant::now();
                        r.first.get_or_insert(r.last);
                        r.bytes += n as u64;
                    }
                    Err(e) => break Err(e),
                }
            };
            let _ = tx.send(outcome);
        });
        procs::wait_timeout(&mut child, procs::COMMAND_TIMEOUT, &what).map_err(|e| {
            let text = std::fs::read_to_string(&err).unwrap_or_default();
            e.context(procs::strip_ansi(text.lines().last().unwrap_or("")))
        })?;
        guard.deleted();
        let reading = rx
            .recv_timeout(Duration::from_secs(30))
            .context("the container's stdout stayed open after `run` exited")?
            .context("read the container's stdout")?;
        Ok(reading)
    }

    /// `count` containers of `bundle` started in parallel with `run -d`: the wall time until
    /// every `run -d` returned (each container runs, its agent answered), and the pods. A pod
    /// whose start fails is deleted and started again once; the first failures are kept in
    /// [`Pods::retried`], to be reported.
    pub fn start_pods(&self, bundle: &Path, prefix: &str, count: u32) -> Result<(Duration, Pods)> {
        let bundle = path_str(bundle)?;
        let mut pods = Pods {
            cli: self.clone(),
            ids: (0..count).map(|i| format!("{prefix}{i}")).collect(),
            retried: Vec::new(),
        };
        let start = |id: &str, log: &str| {
            let mut cmd = self.cmd(&["run", "-d", "--bundle", bundle, id]);
            timed(&mut cmd, &self.logs, log)
        };
        let started = Instant::now();
        let results: Vec<(String, Option<String>, Result<Duration>)> = std::thread::scope(|s| {
            let handles: Vec<_> = pods
                .ids
                .iter()
                .map(|id| {
                    s.spawn(move || match start(id, id) {
                        Ok(d) => (id.clone(), None, Ok(d)),
                        Err(first) => {
                            delete(self, id);
                            let again = start(id, &format!("{id}-again"));
                            (id.clone(), Some(format!("{first:#}")), again)
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a pod's thread panicked"))
                .collect()
        });
        let wall = started.elapsed();
        let mut errors = Vec::new();
        for (id, first, r) in results {
            if let Err(e) = r {
                errors.push(format!("{id}: {e:#}"));
            }
            if let Some(first) = first {
                pods.retried.push(format!("{id}: {first}"));
            }
        }
        if let Some(first) = errors.first() {
            bail!(
                "{} of {count} pods did not start, even when started again; the first: {first}",
                errors.len(),
            );
        }
        Ok((wall, pods))
    }
}

/// What came on a container's stdout, and when.
#[derive(Debug)]
struct Reading {
    started: Instant,
    first: Option<Instant>,
    last: Instant,
    bytes: u64,
}

/// A container of a [`Cli`], deleted (`delete -f`) on drop unless marked deleted.
#[derive(Debug)]
pub struct Container<'a> {
    cli: &'a Cli,
    pub id: String,
    live: bool,
}

impl<'a> Container<'a> {
    fn new(cli: &'a Cli, id: &str) -> Self {
        Container {
            cli,
            id: id.to_string(),
            live: true,
        }
    }

    /// The container is gone already (a foreground `run` deletes it).
    fn deleted(&mut self) {
        self.live = false;
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        if self.live {
            delete(self.cli, &self.id);
        }
    }
}

fn delete(cli: &Cli, id: &str) {
    let _ = cli
        .cmd(&["delete", "-f", id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Pods started by [`Cli::start_pods`], deleted in parallel on drop.
#[derive(Debug)]
pub struct Pods {
    cli: Cli,
    pub ids: Vec<String>,
    /// The pods that failed to start at first (and started when tried again), with the error.
    pub retried: Vec<String>,
}

impl Pods {
    /// The host memory of every process of these pods (all processes naming the root).
    pub fn memory(&self) -> Result<Memory> {
        procs::memory_of(&self.cli.root)
    }
}

impl Drop for Pods {
    fn drop(&mut self) {
        let cli = &self.cli;
        std::thread::scope(|s| {
            for id in &self.ids {
                s.spawn(move || delete(cli, id));
            }
        });
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}
