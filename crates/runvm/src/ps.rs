//! `runvm ps`'s table: the columns of procps's `ps -ef` (`UID PID PPID C STIME TTY TIME CMD`),
//! made from what the guest reports of each process (guest pids; user names from the host's
//! `/etc/passwd`, as runc's `ps`, which runs the host's ps, names them).

use runvm_sandbox::agent::GuestProcess;

const NS: u64 = 1_000_000_000;
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// The `ps -ef` table of `processes` at `now_ns` (Unix time), naming uids with `user`.
pub fn table(
    processes: &[GuestProcess],
    now_ns: u64,
    user: impl Fn(u32) -> Option<String>,
) -> String {
    let mut out = format!(
        "{:<8} {:>7} {:>7} {:>2} {:<5} {:<8} {:>8} CMD\n",
        "UID", "PID", "PPID", "C", "STIME", "TTY", "TIME"
    );
    for p in processes {
        let elapsed = now_ns.saturating_sub(p.started_unix_ns);
        let c = if elapsed == 0 {
            0
        } else {
            (u128::from(p.cpu_time_ns) * 100 / u128::from(elapsed)).min(99)
        };
        let tty = if p.tty.is_empty() { "?" } else { &p.tty };
        let name = user(p.uid).unwrap_or_else(|| p.uid.to_string());
        out.push_str(&format!(
            "{name:<8} {:>7} {:>7} {c:>2} {:<5} {tty:<8} {:>8} {}\n",
            p.pid,
            p.ppid,
            stime(p.started_unix_ns, now_ns),
            cpu_time(p.cpu_time_ns),
            p.cmd
        ));
    }
    out
}

/// ps's STIME: `HH:MM` within the last day, else `MonDD` (UTC).
fn stime(started_ns: u64, now_ns: u64) -> String {
    let secs = started_ns / NS;
    if now_ns.saturating_sub(started_ns) < 24 * 3600 * NS {
        return format!("{:02}:{:02}", secs % 86_400 / 3600, secs % 3600 / 60);
    }
    // "2024-05-01T..." from the RFC 3339 text of the same instant.
    let date = runvm_sandbox::standalone::rfc3339(started_ns);
    let month: usize = date.get(5..7).and_then(|m| m.parse().ok()).unwrap_or(1);
    let day = date.get(8..10).unwrap_or("01");
    format!("{}{day}", MONTHS[(month.clamp(1, 12)) - 1])
}

/// ps's TIME: `[DD-]HH:MM:SS` of CPU time.
fn cpu_time(ns: u64) -> String {
    let s = ns / NS;
    let (days, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    if days > 0 {
        format!("{days}-{h:02}:{m:02}:{sec:02}")
    } else {
        format!("{h:02}:{m:02}:{sec:02}")
    }
}

/// The host's name for `uid` (from `/etc/passwd`).
pub fn host_user(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_ps_ef_columns() {
        let now = 1_700_000_000 * NS;
        let p = GuestProcess {
            pid: 12,
            cmd: "sleep 600".into(),
            ppid: 1,
            uid: 0,
            started_unix_ns: now - 100 * NS,
            tty: String::new(),
            cpu_time_ns: 2 * NS,
        };
        let t = table(&[p], now, |uid| (uid == 0).then(|| "root".to_string()));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "UID          PID    PPID  C STIME TTY          TIME CMD"
        );
        assert_eq!(
            lines[1],
            "root          12       1  2 22:11 ?        00:00:02 sleep 600"
        );
        assert_eq!(cpu_time(90_061 * NS), "1-01:01:01");
        assert_eq!(stime(now - 3 * 86_400 * NS, now), "Nov11");
        assert!(host_user(0).is_some());
    }
}
