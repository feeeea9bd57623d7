//! The start timeline of a sandbox and its containers: when each phase ended, host and guest,
//! on the host's clock (ns since the Unix epoch). It is kept in the sandbox record
//! ([`SandboxRecord::timeline`](crate::state::SandboxRecord)), printed as a text waterfall by
//! `runvm events --timeline ID` and drawn as SVG on request.
//!
//! Phases, in the order a cold `runvm run` passes them:
//! `config-loaded` (the creating process loaded its configuration), `created` (the record
//! exists), `helpers-started` (virtiofsd and vhost-device-vsock have their sockets),
//! `qemu-spawned`, `qmp-connected`, `vm-started`, `guest:kernel-started`, `guest:init-entered`,
//! `guest:modules-loaded`, `guest:agent-listening`, `agent-ready` (the host's first answer from
//! the agent), then per container `container-created:CID`, `process-started:CID` and
//! `first-output:CID`. Guest phases come from the agent's clock (CLOCK_BOOTTIME), placed on
//! the host's clock through the time of the guest's report.

use std::fmt::Write as _;
use std::sync::Mutex;

use crate::agent::GuestBootTimes;

/// The prefix of phases measured by the guest.
pub const GUEST_PREFIX: &str = "guest:";

static CONFIG_LOADED: Mutex<Option<u64>> = Mutex::new(None);

/// Notes that this process loaded its configuration now (called by `Config::load`).
pub fn note_config_loaded(at_ns: u64) {
    if let Ok(mut slot) = CONFIG_LOADED.lock() {
        *slot = Some(at_ns);
    }
}

/// When this process last loaded its configuration, if it did.
pub fn config_loaded_at() -> Option<u64> {
    CONFIG_LOADED.lock().ok().and_then(|slot| *slot)
}

/// The guest's boot phases on the host's clock. `sent_ns` and `received_ns` are the host's
/// times around the request that returned `boot`; the guest's `now_us` is taken to be their
/// midpoint. Nothing if the guest did not report its clock.
pub fn guest_phases(boot: &GuestBootTimes, sent_ns: u64, received_ns: u64) -> Vec<(String, u64)> {
    if boot.now_us == 0 {
        return Vec::new();
    }
    let midpoint = sent_ns / 2 + received_ns / 2;
    let kernel = midpoint.saturating_sub(boot.now_us.saturating_mul(1000));
    let at = |us: u64| kernel.saturating_add(us.saturating_mul(1000));
    [
        ("kernel-started", 0),
        ("init-entered", boot.init_entered_us),
        ("modules-loaded", boot.modules_loaded_us),
        ("agent-listening", boot.agent_listening_us),
    ]
    .into_iter()
    .filter(|(name, us)| *us > 0 || *name == "kernel-started")
    .map(|(name, us)| (format!("{GUEST_PREFIX}{name}"), at(us)))
    .collect()
}

/// One phase of a timeline, relative to its first phase.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// The phase's name.
    pub name: String,
    /// When it ended, ms after the first phase.
    pub at_ms: f64,
    /// How long it took: ms since the phase before it.
    pub took_ms: f64,
}

/// The phases sorted by time (ties keep their recorded order), relative to the first.
pub fn steps(timeline: &[(String, u64)]) -> Vec<Step> {
    let mut sorted: Vec<&(String, u64)> = timeline.iter().collect();
    sorted.sort_by_key(|(_, at)| *at);
    let Some(first) = sorted.first().map(|(_, at)| *at) else {
        return Vec::new();
    };
    let mut previous = first;
    sorted
        .into_iter()
        .map(|(name, at)| {
            let step = Step {
                name: name.clone(),
                at_ms: (at - first) as f64 / 1e6,
                took_ms: (at - previous) as f64 / 1e6,
            };
            previous = *at;
            step
        })
        .collect()
}

/// Width of the bars of [`waterfall`], in characters.
const BAR_WIDTH: usize = 48;

/// A text waterfall: one line per phase with its time since the first phase, its duration,
/// and a bar from the previous phase's end to its own.
pub fn waterfall(timeline: &[(String, u64)]) -> String {
    let steps = steps(timeline);
    let total = steps.last().map_or(0.0, |s| s.at_ms).max(f64::EPSILON);
    let name_width = steps.iter().map(|s| s.name.len()).max().unwrap_or(5).max(5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:name_width$}  {:>9}  {:>9}",
        "phase", "at (ms)", "took (ms)"
    );
    for s in &steps {
        let start = (((s.at_ms - s.took_ms) / total) * BAR_WIDTH as f64).round() as usize;
        let end = ((s.at_ms / total) * BAR_WIDTH as f64).round() as usize;
        let bar = if end > start {
            "█".repeat(end - start)
        } else {
            "▏".to_string()
        };
        let _ = writeln!(
            out,
            "{:name_width$}  {:>9.1}  {:>9.1}  {}{}",
            s.name,
            s.at_ms,
            s.took_ms,
            " ".repeat(start.min(BAR_WIDTH)),
            bar
        );
    }
    out
}

/// The waterfall as an SVG picture titled `title`.
pub fn svg(timeline: &[(String, u64)], title: &str) -> String {
    let steps = steps(timeline);
    let total = steps.last().map_or(0.0, |s| s.at_ms).max(f64::EPSILON);
    let (label_w, bar_w, row_h, top) = (230.0, 520.0, 22.0, 40.0);
    let width = label_w + bar_w + 90.0;
    let height = top + row_h * steps.len() as f64 + 30.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="monospace" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<text x="10" y="22" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (i, s) in steps.iter().enumerate() {
        let y = top + row_h * i as f64;
        let x0 = label_w + (s.at_ms - s.took_ms) / total * bar_w;
        let w = (s.took_ms / total * bar_w).max(1.0);
        let colour = if s.name.starts_with(GUEST_PREFIX) {
            "#d9822b"
        } else {
            "#2b7bd9"
        };
        let _ = writeln!(
            out,
            r#"<text x="10" y="{:.1}">{}</text><rect x="{x0:.1}" y="{:.1}" width="{w:.1}" height="{:.1}" fill="{colour}"/><text x="{:.1}" y="{:.1}">{:.1} ms</text>"#,
            y + 15.0,
            escape(&s.name),
            y + 4.0,
            row_h - 8.0,
            x0 + w + 6.0,
            y + 15.0,
            s.at_ms
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="10" y="{:.1}" fill="#555">blue: host, orange: guest (placed on the host clock)</text>"##,
        height - 10.0
    );
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn sample() -> Vec<(String, u64)> {
        vec![
            ("created".into(), 1000 * MS),
            ("helpers-started".into(), 1020 * MS),
            ("agent-ready".into(), 4000 * MS),
            ("guest:kernel-started".into(), 1100 * MS),
        ]
    }

    #[test]
    fn steps_are_sorted_by_time_and_relative_to_the_first() {
        let s = steps(&sample());
        let names: Vec<_> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "created",
                "helpers-started",
                "guest:kernel-started",
                "agent-ready"
            ]
        );
        assert_eq!(s[0].at_ms, 0.0);
        assert_eq!(s[2].at_ms, 100.0);
        assert_eq!(s[2].took_ms, 80.0);
        assert_eq!(s[3].took_ms, 2900.0);
        assert!(steps(&[]).is_empty());
    }

    #[test]
    fn guest_phases_are_placed_on_the_host_clock_by_the_reports_midpoint() {
        let boot = GuestBootTimes {
            init_entered_us: 800_000,
            modules_loaded_us: 900_000,
            agent_listening_us: 1_000_000,
            now_us: 1_500_000,
        };
        // The report was asked at 10.0 s and answered at 10.2 s: the guest said 1.5 s at 10.1 s.
        let phases = guest_phases(&boot, 10_000 * MS, 10_200 * MS);
        assert_eq!(
            phases,
            vec![
                ("guest:kernel-started".to_string(), 8_600 * MS),
                ("guest:init-entered".to_string(), 9_400 * MS),
                ("guest:modules-loaded".to_string(), 9_500 * MS),
                ("guest:agent-listening".to_string(), 9_600 * MS),
            ]
        );
        let silent = GuestBootTimes::default();
        assert!(guest_phases(&silent, 10_000 * MS, 10_200 * MS).is_empty());
    }

    #[test]
    fn waterfall_has_a_line_per_phase_with_times_and_bars() {
        let text = waterfall(&sample());
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("phase"));
        assert!(
            lines[4].starts_with("agent-ready") && lines[4].contains("3000.0"),
            "{text}"
        );
        assert!(lines[4].contains('█'), "{text}");
        // The last bar runs from the previous phase's end (100 of 3000 ms: column 2) to the
        // full width (48).
        assert_eq!(lines[4].chars().filter(|c| *c == '█').count(), 46, "{text}");
    }

    #[test]
    fn svg_draws_a_bar_per_phase_and_escapes_names() {
        let mut t = sample();
        t.push(("first-output:<c1>".into(), 4100 * MS));
        let svg = svg(&t, "sandbox a&b");
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<rect").count(), 5);
        assert!(svg.contains("first-output:&lt;c1&gt;") && svg.contains("sandbox a&amp;b"));
    }
}
