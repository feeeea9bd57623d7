//! The results of `bench all`: the printed table, the JSON file and the SVG chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::procs::Memory;
use super::stats::Stats;

/// One measured quantity of one runtime.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    /// What is measured ("cold start to workload", ...); rows of a group are compared.
    pub group: String,
    /// Who is measured ("runvm run", "runc run", ...).
    pub label: String,
    /// "ms", "s", "MiB" or "MB/s".
    pub unit: String,
    /// The accelerator the row ran under ("tcg", "kvm"), or "host" for runc.
    pub accelerator: String,
    /// Whether more is better (throughput) or less (times, memory).
    pub higher_is_better: bool,
    pub samples: Vec<f64>,
    pub stats: Option<Stats>,
    /// Why the row has no figures.
    pub error: Option<String>,
    /// What else there is to know (a breakdown, a ratio).
    pub note: Option<String>,
}

impl Metric {
    /// A row from the outcome of its measurement.
    pub fn new(group: &str, label: &str, unit: &str, accel: &str, r: Result<Vec<f64>>) -> Metric {
        let (samples, error) = match r {
            Ok(s) => (s, None),
            Err(e) => (Vec::new(), Some(format!("{e:#}"))),
        };
        Metric {
            group: group.into(),
            label: label.into(),
            unit: unit.into(),
            accelerator: accel.into(),
            higher_is_better: unit == "MB/s",
            stats: Stats::of(&samples),
            samples,
            error,
            note: None,
        }
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Metric {
        self.note = Some(note.into());
        self
    }
}

/// Everything `bench all` measured.
#[derive(Debug, Serialize)]
pub struct Results {
    /// The accelerator runvm's VMs (and the floor) ran under.
    pub accelerator: String,
    /// Runs of each timed benchmark.
    pub count: u32,
    /// Pods of the density benchmark.
    pub pods: u32,
    pub host: Host,
    /// The guest image's kernel (runvm's VMs and the floor), from its manifest.
    pub guest_kernel: String,
    pub metrics: Vec<Metric>,
    /// The memory measurements by kind of process.
    pub memory: BTreeMap<String, Memory>,
}

/// The machine the benchmark ran on.
#[derive(Debug, Serialize)]
pub struct Host {
    pub cpus: usize,
    pub kernel: String,
    pub load_average_at_start: String,
    pub runvm: String,
}

impl Host {
    pub fn detect(runvm: &Path) -> Host {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        Host {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease"),
            load_average_at_start: read("/proc/loadavg"),
            runvm: runvm.display().to_string(),
        }
    }
}

fn number(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The results as a Markdown table.
pub fn table(r: &Results) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "runvm benchmark: {} runs each, {} pods for density; runvm's VMs and the floor under {} \
         with the guest kernel {} ({} CPUs, host kernel {}, load average at start {})",
        r.count,
        r.pods,
        r.accelerator,
        r.guest_kernel,
        r.host.cpus,
        r.host.kernel,
        r.host
            .load_average_at_start
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(t);
    let _ = writeln!(
        t,
        "| benchmark | runtime | accel | median | min | max | unit | runs | note |"
    );
    let _ = writeln!(t, "|---|---|---|---:|---:|---:|---|---:|---|");
    for m in &r.metrics {
        let (median, min, max) = match m.stats {
            Some(s) => (number(s.median), number(s.min), number(s.max)),
            None => ("FAILED".into(), "".into(), "".into()),
        };
        let note = match (&m.error, &m.note) {
            (Some(e), _) => format!("failed: {}", e.replace('\n', " ").replace('|', "/")),
            (None, Some(n)) => n.clone(),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {median} | {min} | {max} | {} | {} | {note} |",
            m.group,
            m.label,
            m.accelerator,
            m.unit,
            m.samples.len()
        );
    }
    t
}

pub fn write_json(path: &Path, r: &Results) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(r)?)
        .with_context(|| format!("write {}", path.display()))
}

/// `s` for XML text: markup characters escaped, control characters (invalid in XML) dropped.
fn escape(s: &str) -> String {
    let s: String = s.chars().filter(|c| !c.is_control()).collect();
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const WIDTH: f64 = 960.0;
const LABEL_W: f64 = 330.0;
const BAR_W: f64 = 460.0;
const ROW_H: f64 = 22.0;

/// A bar chart: one panel per group, one bar (median) with a min–max whisker per row, each
/// group on its own scale; runvm's bars blue, the others grey.
pub fn svg(r: &Results) -> String {
    let mut groups: Vec<(&str, Vec<&Metric>)> = Vec::new();
    for m in &r.metrics {
        match groups.iter_mut().find(|(g, _)| *g == m.group) {
            Some((_, rows)) => rows.push(m),
            None => groups.push((&m.group, vec![m])),
        }
    }
    let height = 50.0
        + groups
            .iter()
            .map(|(_, rows)| 34.0 + ROW_H * rows.len() as f64)
            .sum::<f64>();
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(&format!(
            "runvm benchmark — VMs under {} — median of {} (whisker: min–max), {} CPUs",
            r.accelerator, r.count, r.host.cpus
        ))
    );
    let mut y = 50.0;
    for (group, rows) in &groups {
        let unit = rows.first().map_or("", |m| m.unit.as_str());
        let better = if rows.first().is_some_and(|m| m.higher_is_better) {
            "higher is better"
        } else {
            "lower is better"
        };
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}" font-weight="bold">{} ({unit}, {better})</text>"#,
            y + 12.0,
            escape(group)
        );
        y += 22.0;
        let scale = rows
            .iter()
            .filter_map(|m| m.stats.map(|st| st.max))
            .fold(0.0_f64, f64::max);
        for m in rows {
            let label = format!("{} [{}]", m.label, m.accelerator);
            let _ = writeln!(
                s,
                r#"<text x="10" y="{}">{}</text>"#,
                y + 14.0,
                escape(&label)
            );
            match m.stats {
                Some(st) if scale > 0.0 => {
                    let w = |v: f64| v / scale * BAR_W;
                    let color = if m.label.starts_with("runvm") {
                        "#3a6ea5"
                    } else {
                        "#9a9a9a"
                    };
                    let _ = writeln!(
                        s,
                        r#"<rect x="{LABEL_W}" y="{}" width="{:.1}" height="14" fill="{color}"/>"#,
                        y + 3.0,
                        w(st.median).max(1.0)
                    );
                    let _ = writeln!(
                        s,
                        r#"<line x1="{:.1}" x2="{:.1}" y1="{y2}" y2="{y2}" stroke="black"/>"#,
                        LABEL_W + w(st.min),
                        LABEL_W + w(st.max),
                        y2 = y + 10.0
                    );
                    let _ = writeln!(
                        s,
                        r#"<text x="{:.1}" y="{}">{} {unit}</text>"#,
                        LABEL_W + w(st.max) + 6.0,
                        y + 14.0,
                        number(st.median)
                    );
                }
                _ => {
                    let why = m.error.as_deref().unwrap_or("no samples");
                    let why: String = why.chars().take(90).collect();
                    let _ = writeln!(
                        s,
                        r##"<text x="{LABEL_W}" y="{}" fill="#b00020">failed: {}</text>"##,
                        y + 14.0,
                        escape(&why)
                    );
                }
            }
            y += ROW_H;
        }
        y += 12.0;
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> Results {
        Results {
            accelerator: "tcg".into(),
            count: 3,
            pods: 2,
            host: Host {
                cpus: 2,
                kernel: "6.1".into(),
                load_average_at_start: "0.0".into(),
                runvm: "runvm".into(),
            },
            guest_kernel: "runvm 6.1.192-runvm".into(),
            metrics: vec![
                Metric::new(
                    "cold start",
                    "runvm run",
                    "ms",
                    "tcg",
                    Ok(vec![3.0, 1.0, 2.0]),
                ),
                Metric::new(
                    "cold start",
                    "runc run",
                    "ms",
                    "host",
                    Err(anyhow::anyhow!("no <runc>\u{1b}")),
                ),
            ],
            memory: BTreeMap::new(),
        }
    }

    #[test]
    fn table_shows_figures_and_failures() {
        let t = table(&results());
        assert!(t.contains("| cold start | runvm run | tcg | 2.00 | 1.00 | 3.00 | ms | 3 |"));
        assert!(t.contains("FAILED"), "{t}");
        assert!(t.contains("failed: no <runc>"), "{t}");
    }

    #[test]
    fn svg_escapes_text_and_has_one_bar_per_measured_row() {
        let s = svg(&results());
        assert!(s.starts_with("<svg"));
        assert!(s.trim_end().ends_with("</svg>"));
        assert!(s.contains("no &lt;runc&gt;"));
        assert_eq!(s.matches("<rect x=").count(), 1);
    }
}
