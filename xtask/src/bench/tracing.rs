//! What traces cost a cold start: `runvm run` of `true` with `[tracing]` off and on (spans
//! exported over OTLP/gRPC to a receiver in this process), runs interleaved, and the spans the
//! receiver got from each traced run, the host's and the guest's (relayed by the host).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use runvm_telemetry::guest::SERVICE_NAME as GUEST_SERVICE;
use runvm_telemetry::receiver::{ReceivedSpan, Receiver};

use super::cli::Cli;
use super::report::Metric;
use super::{edit_config, write_config, Setup};

const TIME: &str = "cold start: tracing off and on";
const COST: &str = "cold start: what tracing costs";
const COST_PCT: &str = "cold start: what tracing costs (%)";
const SPANS: &str = "tracing: spans received per traced run";
/// `service.name` of the `runvm` command's spans.
const HOST_SERVICE: &str = "runvm";
/// How long spans may still come after the last traced `runvm run` exited (they should not:
/// the command sends what is left before it exits).
const LATE_GRACE: Duration = Duration::from_secs(2);

/// Sets `[tracing] otlp_endpoint` of a configuration document to `endpoint`, or, for `None`,
/// removes the `[tracing]` section (traces off, whatever the base configuration said).
fn set_tracing(doc: &mut toml::Table, endpoint: Option<&str>) {
    match endpoint {
        Some(url) => {
            let mut tracing = toml::Table::new();
            tracing.insert("otlp_endpoint".into(), url.into());
            doc.insert("tracing".into(), toml::Value::Table(tracing));
        }
        None => {
            doc.remove("tracing");
        }
    }
}

/// Whether the traced run of pair `i` goes first: off-on, on-off, off-on, ... so that drift
/// and a run's effect on the next one fall on both sides alike.
fn traced_first(i: u32) -> bool {
    i % 2 == 1
}

/// What one traced run sent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Sent {
    /// Spans of the `runvm` command.
    host: usize,
    /// Spans of the guest agent, relayed by the host.
    guest: usize,
    /// Spans of any other service.
    other: usize,
    /// Traces (distinct trace ids) of the host's spans.
    traces: usize,
    /// Guest spans in none of the host's traces.
    orphans: usize,
}

impl Sent {
    fn of(spans: &[ReceivedSpan]) -> Sent {
        let host_traces: BTreeSet<&str> = spans
            .iter()
            .filter(|s| s.service == HOST_SERVICE)
            .map(|s| s.trace_id.as_str())
            .collect();
        let mut sent = Sent {
            traces: host_traces.len(),
            ..Sent::default()
        };
        for s in spans {
            match s.service.as_str() {
                HOST_SERVICE => sent.host += 1,
                GUEST_SERVICE => {
                    sent.guest += 1;
                    if !host_traces.contains(s.trace_id.as_str()) {
                        sent.orphans += 1;
                    }
                }
                _ => sent.other += 1,
            }
        }
        sent
    }
}

/// On minus off of each pair of runs, in ms and in % of the off run.
fn differences(off: &[f64], on: &[f64]) -> (Vec<f64>, Vec<f64>) {
    off.iter()
        .zip(on)
        .map(|(off, on)| {
            let pct = if *off > 0.0 {
                (on - off) / off * 100.0
            } else {
                0.0
            };
            (on - off, pct)
        })
        .unzip()
}

/// The figures of the interleaved runs.
#[derive(Debug, Default)]
struct Runs {
    off: Vec<f64>,
    on: Vec<f64>,
    sent: Vec<Sent>,
    /// Spans that came after the traced run they belong to had exited.
    late: usize,
    /// The first line of each traced run's stderr that has any.
    stderr: Vec<String>,
}

impl Setup {
    /// The cold start with traces off and on, `k` each, interleaved.
    pub(super) fn tracing(&self) -> Vec<Metric> {
        let k = self.k();
        eprintln!(
            "==> tracing: cold runvm run of busybox true, traces off and on (OTLP to a local \
             receiver), {k} each, interleaved"
        );
        let runs = self.tracing_runs(&self.work.join("tracing"));
        let split = |pick: fn(&Runs) -> Vec<f64>| match &runs {
            Ok(r) => Ok(pick(r)),
            Err(e) => Err(anyhow!("{e:#}")),
        };
        let off = Metric::new(
            TIME,
            "cold runvm run, tracing off",
            "ms",
            self.accel(),
            split(|r| r.off.clone()),
        )
        .with_note("`true`: start to exit, no [tracing]");
        let mut on = Metric::new(
            TIME,
            "cold runvm run, tracing on (OTLP to a local receiver)",
            "ms",
            self.accel(),
            split(|r| r.on.clone()),
        )
        .with_note("the command's exit waits until its spans are sent");
        let mut diff = Metric::new(
            COST,
            "tracing on − off, paired runs",
            "ms",
            self.accel(),
            split(|r| differences(&r.off, &r.on).0),
        );
        let pct = Metric::new(
            COST_PCT,
            "tracing on − off, paired runs, % of off",
            "%",
            self.accel(),
            split(|r| differences(&r.off, &r.on).1),
        );
        if let (Some(a), Some(b)) = (off.stats, on.stats) {
            let d = b.median - a.median;
            diff.note = Some(format!(
                "medians: on − off = {d:+.1} ms ({:+.1}%)",
                d / a.median * 100.0
            ));
        }
        let Ok(r) = &runs else {
            let spans = |label| Metric::new(SPANS, label, "spans", self.accel(), split(|_| vec![]));
            return vec![
                off,
                on,
                diff,
                pct,
                spans("host (service runvm)"),
                spans("guest (service runvm-agent)"),
            ];
        };
        if !r.stderr.is_empty() {
            on.note = Some(format!(
                "{}; {} of {k} traced runs wrote to stderr, e.g. {:?}",
                on.note.take().unwrap_or_default(),
                r.stderr.len(),
                r.stderr[0]
            ));
        }
        let counts = |pick: fn(&Sent) -> usize| r.sent.iter().map(|s| pick(s) as f64).collect();
        let host_total: usize = r.sent.iter().map(|s| s.host).sum();
        let guest_total: usize = r.sent.iter().map(|s| s.guest).sum();
        let traces: usize = r.sent.iter().map(|s| s.traces).sum();
        let orphans: usize = r.sent.iter().map(|s| s.orphans).sum();
        let other: usize = r.sent.iter().map(|s| s.other).sum();
        let host = if host_total == 0 {
            Err(anyhow!(
                "the receiver got no {HOST_SERVICE:?} spans from {k} traced runs: the command \
                 did not export its trace (a bug)"
            ))
        } else {
            Ok(counts(|s| s.host))
        };
        let mut host = Metric::new(SPANS, "host (service runvm)", "spans", self.accel(), host)
            .with_note(format!(
                "{traces} traces in {k} runs; {} late (after the run exited){}",
                r.late,
                if other > 0 {
                    format!("; {other} spans of other services")
                } else {
                    String::new()
                }
            ));
        let guest = if guest_total == 0 {
            Err(anyhow!(
                "the receiver got no {GUEST_SERVICE:?} spans from {k} traced runs \
                 ({host_total} host spans): the host did not relay the guest agent's spans \
                 (a bug)"
            ))
        } else {
            Ok(counts(|s| s.guest))
        };
        let guest = Metric::new(
            SPANS,
            "guest (service runvm-agent)",
            "spans",
            self.accel(),
            guest,
        )
        .with_note(format!(
            "relayed by the host; {orphans} outside the host's traces"
        ));
        if host.error.is_none() && r.sent.iter().any(|s| s.traces != 1) {
            host.note = Some(format!(
                "{}; expected one trace per run",
                host.note.take().unwrap_or_default()
            ));
        }
        vec![off, on, diff, pct, host, guest]
    }

    /// Interleaved cold runs in `dir`, traces off and on; the first failure fails them all.
    fn tracing_runs(&self, dir: &Path) -> Result<Runs> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let receiver = Receiver::start().context("start the OTLP receiver")?;
        let off = self.tracing_cli(dir, "off", None)?;
        let on = self.tracing_cli(dir, "on", Some(&receiver.endpoint()))?;
        let truth = &self.bundles.truth;
        let mut runs = Runs::default();
        let mut seen = 0;
        for i in 0..self.k() {
            for traced in [traced_first(i), !traced_first(i)] {
                if !traced {
                    runs.off.push(ms(off.run(truth, &format!("trace-off{i}"))?));
                    continue;
                }
                let before = receiver.spans().len();
                runs.late += before - seen;
                let id = format!("trace-on{i}");
                runs.on.push(ms(on.run(truth, &id)?));
                let spans = receiver.spans();
                seen = spans.len();
                runs.sent.push(Sent::of(&spans[before..]));
                let err =
                    std::fs::read_to_string(on.logs.join(format!("{id}.err"))).unwrap_or_default();
                if let Some(line) = err.lines().find(|l| !l.trim().is_empty()) {
                    runs.stderr.push(super::procs::strip_ansi(line));
                }
            }
        }
        let spans = receiver.wait_for(LATE_GRACE, |s| s.len() > seen);
        runs.late += spans.len() - seen;
        if runs.on.is_empty() {
            bail!("no traced run");
        }
        Ok(runs)
    }

    /// The `runvm` command line of this step, its state in `dir`, with the benchmark's
    /// configuration and traces sent to `endpoint` (`None`: no traces).
    fn tracing_cli(&self, dir: &Path, name: &str, endpoint: Option<&str>) -> Result<Cli> {
        let config = dir.join(format!("runvm-tracing-{name}.toml"));
        write_config(&self.base, &dir.join("state"), &config)?;
        edit_config(&config, |doc| set_tracing(doc, endpoint))?;
        let mut cli = self.runvm.within(dir)?;
        cli.config = config;
        Ok(cli)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use runvm_sandbox::config::Config;

    fn span(service: &str, trace: &str) -> ReceivedSpan {
        ReceivedSpan {
            service: service.into(),
            trace_id: trace.into(),
            span_id: "s".into(),
            parent_span_id: String::new(),
            name: "n".into(),
        }
    }

    #[test]
    fn traced_config_is_the_benchmark_config_plus_the_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("base.toml");
        std::fs::write(&file, "[hypervisor]\nvcpus = 2\n").unwrap();
        let base = Config::load(Some(&file)).unwrap();
        let path = dir.path().join("on.toml");
        write_config(&base, Path::new("/b/state"), &path).unwrap();
        let plain = Config::load(Some(&path)).unwrap();
        edit_config(&path, |doc| set_tracing(doc, Some("http://127.0.0.1:4317"))).unwrap();
        let traced = Config::load(Some(&path)).unwrap();
        assert_eq!(traced.tracing.otlp_endpoint, "http://127.0.0.1:4317");
        assert!(traced.tracing.enabled());
        let mut rest = traced.clone();
        rest.tracing = Default::default();
        assert_eq!(rest, plain);
    }

    #[test]
    fn untraced_config_drops_an_endpoint_the_base_config_set() {
        let mut doc: toml::Table = "[tracing]\notlp_endpoint = \"http://h:1\"\n[agent]\nx = 1\n"
            .parse()
            .unwrap();
        set_tracing(&mut doc, None);
        assert!(!doc.contains_key("tracing"));
        assert!(doc.contains_key("agent"));
        set_tracing(&mut doc, Some("http://h:2"));
        assert_eq!(doc["tracing"]["otlp_endpoint"].as_str(), Some("http://h:2"));
    }

    #[test]
    fn traced_runs_alternate_sides() {
        let order: Vec<bool> = (0..4).map(traced_first).collect();
        assert_eq!(order, [false, true, false, true]);
    }

    #[test]
    fn spans_are_counted_per_service_and_guest_spans_outside_host_traces_noted() {
        let spans = [
            span("runvm", "t1"),
            span("runvm", "t1"),
            span("runvm-agent", "t1"),
            span("runvm-agent", "t2"),
            span("other", "t1"),
        ];
        assert_eq!(
            Sent::of(&spans),
            Sent {
                host: 2,
                guest: 2,
                other: 1,
                traces: 1,
                orphans: 1
            }
        );
        assert_eq!(Sent::of(&[]), Sent::default());
    }

    #[test]
    fn differences_pair_runs_in_ms_and_percent() {
        let (ms, pct) = differences(&[100.0, 200.0, 0.0], &[110.0, 190.0, 5.0]);
        assert_eq!(ms, [10.0, -10.0, 5.0]);
        assert_eq!(pct, [10.0, -5.0, 0.0]);
    }
}
