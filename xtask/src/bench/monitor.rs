//! What a `runvm monitor` scrape costs: the monitor started over a root of idle pods, scraped
//! again and again; the CPU time it used per scrape (from its /proc stat) and the wall time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::cli::Cli;
use super::stats::median;

/// Scrapes timed after the first (which opens every agent connection).
const SCRAPES: u32 = 20;

/// The cost of scrapes of a root's sandboxes.
#[derive(Debug, Clone)]
pub struct ScrapeCost {
    /// The monitor's CPU time per scrape, ms, one sample per scrape.
    pub cpu_ms: Vec<f64>,
    /// Median wall time of a scrape, ms.
    pub wall_ms: f64,
    /// Wall time of the first scrape (agent connections opened), ms.
    pub first_wall_ms: f64,
    /// Sandboxes the monitor reported.
    pub sandboxes: u64,
}

struct Monitor(Child);

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `runvm monitor` over `cli`'s root and measures [`SCRAPES`] scrapes, with PSS read at
/// every scrape (`fresh_pss`) or kept between readings (the monitor's default age).
pub fn scrape_cost(cli: &Cli, fresh_pss: bool) -> Result<ScrapeCost> {
    let mut args = vec!["monitor", "--listen", "127.0.0.1:0"];
    if fresh_pss {
        args.extend(["--pss-max-age-secs", "0"]);
    }
    let mut child = cli
        .cmd(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("start runvm monitor")?;
    let stdout = child.stdout.take().context("the monitor's stdout")?;
    let monitor = Monitor(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let address: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address in the monitor's first line {line:?}"))?;
    let pid = monitor.0.id();
    let started = Instant::now();
    let first = scrape(address)?;
    let first_wall_ms = started.elapsed().as_secs_f64() * 1e3;
    let sandboxes = first
        .lines()
        .find_map(|l| l.strip_prefix("runvm_monitor_sandboxes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut cpu_ms = Vec::new();
    let mut walls = Vec::new();
    for _ in 0..SCRAPES {
        let cpu_before = cpu_seconds(pid)?;
        let t = Instant::now();
        scrape(address)?;
        walls.push(t.elapsed().as_secs_f64() * 1e3);
        cpu_ms.push((cpu_seconds(pid)? - cpu_before) * 1e3);
    }
    Ok(ScrapeCost {
        cpu_ms,
        wall_ms: median(walls),
        first_wall_ms,
        sandboxes,
    })
}

fn scrape(address: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect(address)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    match answer.split_once("\r\n\r\n") {
        Some((head, body)) if head.contains(" 200 ") => Ok(body.to_string()),
        _ => bail!("the monitor answered {answer:.200}"),
    }
}

/// CPU time of every thread of `pid`, seconds (schedstat's nanoseconds: finer than stat's
/// clock ticks, which are 10 ms).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let mut ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let text = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        ns += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(ns as f64 / 1e9)
}
