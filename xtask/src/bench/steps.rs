//! The steps of `bench all`, each turning its outcome (figures or an error) into rows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};

use super::cli::{Cli, Runtime};
use super::containerd::{Containerd, RUNC_SHIM, RUNVM_SHIM};
use super::cri;
use super::floor::Floor;
use super::monitor::{scrape_cost, ScrapeCost};
use super::procs::Memory;
use super::report::{self, Metric, Results};
use super::{breakdown, mib, ratio, times, write_config, Bench, Setup};

const COLD: &str = "cold start to workload";
const CTR: &str = "cold start: ctr run --rm";
const EXEC: &str = "exec latency";
const CRI_RUN: &str = "CRI: run a pod";
const CRI_START: &str = "CRI: start a container in a running pod";
const CRI_STOP: &str = "CRI: stop a pod";
const MEM: &str = "host memory per idle pod (PSS)";
const TP: &str = "stdout throughput";
const DENSITY: &str = "density";
const SCRAPE: &str = "runvm monitor: one scrape";

/// What [`Setup::idle_pods`] found.
struct IdlePods {
    wall: Duration,
    memory: Memory,
    /// What a `runvm monitor` scrape of them cost, PSS read every time and kept.
    scrape: [Result<ScrapeCost>; 2],
    /// Pods that failed to start at first, with the error.
    retried: Vec<String>,
}

impl IdlePods {
    fn retry_note(&self) -> Option<String> {
        (!self.retried.is_empty()).then(|| {
            format!(
                "{} pod(s) failed to start at first and were started again: {}",
                self.retried.len(),
                self.retried.join("; ")
            )
        })
    }
}

/// The kernel of the guest image whose vmlinuz is `kernel`, as its manifest names it
/// (`runvm 6.1.192-runvm`, `debian-cloud 6.1.0-...`); its path when there is no manifest.
fn guest_kernel(kernel: &Path) -> String {
    let manifest = kernel
        .parent()
        .map(|d| d.join("manifest.json"))
        .and_then(|m| std::fs::read(m).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let field =
        |m: &serde_json::Value, k: &str| m.get(k).and_then(|v| v.as_str()).map(String::from);
    match manifest {
        Some(m) => {
            let kind = field(&m, "kernel").unwrap_or_else(|| "?".into());
            let release = field(&m, "kernel_release")
                .or_else(|| field(&m, "kernel_package_version"))
                .unwrap_or_default();
            format!("{kind} {release}").trim().to_string()
        }
        None => kernel.display().to_string(),
    }
}

/// An error to report in more than one row.
fn again<T>(r: &Result<T>) -> Result<Vec<f64>> {
    match r {
        Ok(_) => Ok(Vec::new()),
        Err(e) => Err(anyhow!("{e:#}")),
    }
}

impl Setup {
    fn wants(&self, b: Bench) -> bool {
        self.args.only.is_empty() || self.args.only.contains(&b)
    }

    pub(super) fn k(&self) -> u32 {
        self.args.count
    }

    pub(super) fn accel(&self) -> &str {
        &self.accel
    }

    /// Runs the chosen benchmarks; a failed one becomes a failed row. Density runs before the
    /// memory step, which takes its figure for 10 pods when N is 10; rows are in the order of
    /// the README.
    pub(super) fn measure(&self, runvm: &Path) -> (Results, PathBuf) {
        let mut memory = BTreeMap::new();
        let mut metrics = Vec::new();
        if self.wants(Bench::Cold) {
            metrics.extend(self.cold());
        }
        if self.wants(Bench::Floor) {
            let floor = self.floor();
            for vm in metrics
                .iter_mut()
                .filter(|m| m.group == COLD && m.label.starts_with("runvm run"))
            {
                if let Some(r) = ratio(vm, &floor) {
                    let note = vm.note.take().unwrap_or_default();
                    vm.note = Some(format!("{r:.2}x the floor; {note}"));
                }
            }
            metrics.push(floor);
        }
        if self.wants(Bench::Ctr) {
            metrics.extend(self.ctr());
        }
        if self.wants(Bench::Factory) {
            metrics.extend(self.factory());
        }
        if self.wants(Bench::Tracing) {
            metrics.extend(self.tracing());
        }
        if self.wants(Bench::Cri) {
            metrics.extend(self.cri());
        }
        if self.wants(Bench::Exec) {
            metrics.extend(self.exec());
        }
        let (density, ten) = if self.wants(Bench::Density) {
            self.density(&mut memory)
        } else {
            (Vec::new(), None)
        };
        if self.wants(Bench::Memory) {
            metrics.extend(self.memory(ten, &mut memory));
        }
        if self.wants(Bench::Throughput) {
            metrics.extend(self.throughput());
        }
        metrics.extend(density);
        (
            Results {
                accelerator: self.accel.clone(),
                count: self.k(),
                pods: self.args.pods,
                host: report::Host::detect(runvm),
                guest_kernel: guest_kernel(&self.base.guest.kernel),
                metrics,
                memory,
            },
            self.args.out_dir.clone(),
        )
    }

    fn cold(&self) -> Vec<Metric> {
        let k = self.k();
        eprintln!("==> cold start: runvm run / runc run of busybox true, {k} each");
        let vm = self
            .runvm
            .within(&self.work.join("cold-runvm"))
            .and_then(|c| times(k, |i| c.run(&self.bundles.truth, &format!("cold{i}"))));
        let rc = times(k, |i| {
            self.runc.run(&self.bundles.truth, &format!("runc-cold{i}"))
        });
        let vm_echo = self
            .runvm
            .within(&self.work.join("cold-runvm-echo"))
            .and_then(|c| {
                times(k, |i| {
                    c.first_output(&self.bundles.echo, &format!("echo{i}"))
                })
            });
        let rc_echo = times(k, |i| {
            self.runc
                .first_output(&self.bundles.echo, &format!("runc-echo{i}"))
        });
        vec![
            Metric::new(COLD, "runvm run", "ms", self.accel(), vm)
                .with_note("`true`: start to exit (the VM powers off behind it)"),
            Metric::new(COLD, "runc run", "ms", "host", rc).with_note("`true`: start to exit"),
            Metric::new(COLD, "runvm run: first output", "ms", self.accel(), vm_echo)
                .with_note("`echo`: start to its first byte on stdout"),
            Metric::new(COLD, "runc run: first output", "ms", "host", rc_echo)
                .with_note("`echo`: start to its first byte on stdout"),
        ]
    }

    fn floor(&self) -> Metric {
        let k = self.k();
        eprintln!("==> floor: QEMU, same kernel, init powers off at once, {k} runs");
        let (accel, floor) = match Floor::prepare(&self.base, &self.work.join("floor")) {
            Ok(f) => (f.accelerator.to_string(), times(k, |i| f.run(i))),
            Err(e) => (self.accel.clone(), Err(e)),
        };
        Metric::new(COLD, "floor: QEMU kernel→init→exit", "ms", &accel, floor)
    }

    fn ctr(&self) -> Vec<Metric> {
        let k = self.k();
        eprintln!("==> ctr run --rm through runvm's shim and runc's shim, {k} each");
        let config = self.work.join("shim-runvm.toml");
        let ctd = write_config(&self.base, &self.work.join("shim-state"), &config)
            .and_then(|()| Containerd::start(&self.work.join("ctd"), &self.shim, &config));
        let (vm, rc) = match &ctd {
            Ok(c) => (
                times(k, |i| c.run_true(RUNVM_SHIM, &format!("ctr-vm{i}"))),
                times(k, |i| c.run_true(RUNC_SHIM, &format!("ctr-runc{i}"))),
            ),
            Err(_) => (again(&ctd), again(&ctd)),
        };
        drop(ctd);
        vec![
            Metric::new(CTR, "runvm shim", "ms", self.accel(), vm),
            Metric::new(CTR, "runc shim", "ms", "host", rc),
        ]
    }

    fn cri(&self) -> Vec<Metric> {
        let k = self.k();
        eprintln!("==> CRI: run a pod, start a container in it, stop it; runvm and runc, {k} each");
        let config = self.work.join("cri-runvm.toml");
        let logs = self.work.join("cri-logs");
        let ctd = write_config(&self.base, &self.work.join("cri-state"), &config)
            .and_then(|()| std::fs::create_dir_all(&logs).map_err(Into::into))
            .and_then(|()| {
                Containerd::start_cri(
                    &self.work.join("cri"),
                    &self.shim,
                    &config,
                    "runvmbench0",
                    "10.231.78.0/24",
                )
            });
        let (vm, rc) = match &ctd {
            Ok(c) => (
                cri::rounds(c.socket(), "runvm", k, &logs),
                cri::rounds(c.socket(), "runc", k, &logs),
            ),
            Err(e) => (Err(anyhow!("{e:#}")), Err(anyhow!("{e:#}"))),
        };
        drop(ctd);
        type Pick = fn(&cri::Rounds) -> &Vec<f64>;
        let split = |r: &Result<cri::Rounds>, pick: Pick| match r {
            Ok(r) => Ok(pick(r).clone()),
            Err(e) => Err(anyhow!("{e:#}")),
        };
        let mut rows = Vec::new();
        let groups: [(&str, Pick); 3] = [
            (CRI_RUN, |r| &r.run_pod),
            (CRI_START, |r| &r.start_container),
            (CRI_STOP, |r| &r.stop_pod),
        ];
        for (group, pick) in groups {
            let mut row = Metric::new(group, "runvm", "ms", self.accel(), split(&vm, pick));
            let runc = Metric::new(group, "runc", "ms", "host", split(&rc, pick));
            if let Some(r) = ratio(&row, &runc) {
                row.note = Some(format!("{r:.1}x runc"));
            }
            rows.push(row);
            rows.push(runc);
        }
        rows
    }

    fn exec(&self) -> Vec<Metric> {
        let k = self.k();
        eprintln!("==> exec true into a running container, {k} each");
        let vm = self
            .runvm
            .within(&self.work.join("exec"))
            .and_then(|c| self.exec_into(&c));
        let rc = self.exec_into(&self.runc);
        let mut vm = Metric::new(EXEC, "runvm exec", "ms", self.accel(), vm);
        let rc = Metric::new(EXEC, "runc exec", "ms", "host", rc);
        if let Some(r) = ratio(&vm, &rc) {
            vm.note = Some(format!("{r:.1}x runc"));
        }
        vec![vm, rc]
    }

    /// `k` times `exec true` into a running sleeper of `cli`.
    fn exec_into(&self, cli: &Cli) -> Result<Vec<f64>> {
        let id = match cli.runtime {
            Runtime::Runvm => "exec-vm",
            Runtime::Runc => "runc-exec",
        };
        let container = cli.run_detached(&self.bundles.sleeper, id)?;
        times(self.k(), |i| cli.exec_true(&container.id, i))
    }

    fn throughput(&self) -> Vec<Metric> {
        let (k, mb) = (self.k(), self.args.stdout_mib);
        eprintln!("==> stdout throughput: {mb} MiB through run, {k} each");
        let expect = mb << 20;
        let rates = |cli: &Cli, prefix: &str| -> Result<Vec<f64>> {
            (0..k)
                .map(|i| {
                    cli.stdout_throughput(&self.bundles.writer, &format!("{prefix}{i}"), expect)
                })
                .collect()
        };
        let vm = self
            .runvm
            .within(&self.work.join("tp"))
            .and_then(|c| rates(&c, "tp"));
        let rc = rates(&self.runc, "runc-tp");
        let note = format!("{mb} MiB");
        vec![
            Metric::new(TP, "runvm run", "MB/s", self.accel(), vm).with_note(note.clone()),
            Metric::new(TP, "runc run", "MB/s", "host", rc).with_note(note),
        ]
    }

    /// The density rows, and the pods' figures when N is 10 (for the memory step).
    fn density(
        &self,
        memory: &mut BTreeMap<String, Memory>,
    ) -> (Vec<Metric>, Option<Result<IdlePods>>) {
        let n = self.args.pods;
        eprintln!("==> density: {n} idle pods started in parallel");
        let r = self.idle_pods(n, "density");
        let (wall, pss) = match &r {
            Ok(p) => {
                memory.insert(format!("{n} pods (density)"), p.memory.clone());
                (
                    Ok(vec![p.wall.as_secs_f64()]),
                    Ok(vec![mib(p.memory.pss_kib)]),
                )
            }
            Err(_) => (again(&r), again(&r)),
        };
        let label = format!("runvm: {n} pods, wall time until all run");
        let mut wall = Metric::new(DENSITY, &label, "s", self.accel(), wall);
        wall.note = r.as_ref().ok().and_then(IdlePods::retry_note);
        let label = format!("runvm: {n} pods, total PSS");
        let mut rows = vec![wall, Metric::new(DENSITY, &label, "MiB", self.accel(), pss)];
        for (i, how) in ["PSS read every scrape", "PSS readings kept"]
            .iter()
            .enumerate()
        {
            let label = format!("{n} idle pods, monitor CPU time, {how}");
            let scrape = match &r {
                Ok(p) => p.scrape[i].as_ref().map_err(|e| anyhow!("{e:#}")),
                Err(e) => Err(anyhow!("{e:#}")),
            };
            let note = scrape.as_ref().ok().map(|s| {
                format!(
                    "{} sandboxes seen; wall time {:.1} ms (median), first scrape {:.1} ms \
                     (opens every agent connection)",
                    s.sandboxes, s.wall_ms, s.first_wall_ms
                )
            });
            let mut row = Metric::new(
                SCRAPE,
                &label,
                "ms",
                self.accel(),
                scrape.map(|s| s.cpu_ms.clone()),
            );
            row.note = note;
            rows.push(row);
        }
        (rows, (n == 10).then_some(r))
    }

    /// PSS per pod of 1 and of 10 idle pods (those of `ten` when given).
    fn memory(
        &self,
        mut ten: Option<Result<IdlePods>>,
        memory: &mut BTreeMap<String, Memory>,
    ) -> Vec<Metric> {
        eprintln!("==> memory: PSS of 1 and 10 idle pods");
        let mut rows = Vec::new();
        for n in [1u32, 10] {
            let r = match ten.take() {
                Some(r) if n == 10 => r,
                back => {
                    ten = back;
                    self.idle_pods(n, &format!("mem{n}"))
                }
            };
            let per = r
                .as_ref()
                .map(|p| vec![mib(p.memory.pss_kib) / f64::from(n)])
                .map_err(|e| anyhow!("{e:#}"));
            let label = format!("runvm: {n} pod{}, per pod", if n == 1 { "" } else { "s" });
            let mut row = Metric::new(MEM, &label, "MiB", self.accel(), per);
            if let Ok(p) = &r {
                let m = &p.memory;
                row.note = Some(format!(
                    "total {:.1} MiB; per pod: {}{}",
                    mib(m.pss_kib),
                    breakdown(m, n),
                    p.retry_note().map(|n| format!("; {n}")).unwrap_or_default()
                ));
                memory.insert(format!("{n} idle pods"), m.clone());
            }
            rows.push(row);
        }
        rows
    }

    /// `n` idle sleepers started in parallel in their own root: the wall time until all run,
    /// and their memory after idling.
    fn idle_pods(&self, n: u32, name: &str) -> Result<IdlePods> {
        let cli = self.runvm.within(&self.work.join(name))?;
        let (wall, pods) = cli.start_pods(&self.bundles.sleeper, "p", n)?;
        std::thread::sleep(Duration::from_secs(self.args.idle_secs));
        let memory = pods.memory()?;
        ensure!(
            memory.processes >= n as usize,
            "found {} processes for {n} pods",
            memory.processes
        );
        let scrape = [scrape_cost(&cli, true), scrape_cost(&cli, false)];
        Ok(IdlePods {
            wall,
            memory,
            scrape,
            retried: pods.retried.clone(),
        })
    }
}
