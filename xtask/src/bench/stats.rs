//! Statistics and parsing helpers of the benchmarks.

use serde::Serialize;

/// Median, minimum and maximum of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    /// The statistics of `samples`; `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Stats> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Stats {
            median: median(v.clone()),
            min: v[0],
            max: v[v.len() - 1],
        })
    }
}

/// The median of `v` (the mean of the two middle values for an even count); 0 when empty.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// (Rss, Pss) in KiB from a `/proc/PID/smaps_rollup` text.
pub fn parse_smaps_rollup(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

/// Megabytes (10^6 bytes) per second for `bytes` in `secs`; 0 for a zero duration.
pub fn mb_per_sec(bytes: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        0.0
    } else {
        bytes as f64 / 1e6 / secs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![5.0, 1.0, 3.0]), 3.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }

    #[test]
    fn stats_give_median_min_and_max() {
        let s = Stats::of(&[30.0, 10.0, 20.0, 50.0, 40.0]).unwrap();
        assert_eq!(
            s,
            Stats {
                median: 30.0,
                min: 10.0,
                max: 50.0
            }
        );
        assert_eq!(Stats::of(&[]), None);
    }

    #[test]
    fn smaps_rollup_rss_and_pss_parse() {
        let text = "00400000-7ffd [rollup]\nRss:              123456 kB\nPss:               65432 kB\nPss_Anon: 1 kB\n";
        assert_eq!(parse_smaps_rollup(text), (123_456, 65_432));
        assert_eq!(parse_smaps_rollup("garbage"), (0, 0));
    }

    #[test]
    fn throughput_in_megabytes_per_second() {
        assert_eq!(mb_per_sec(256_000_000, 2.0), 128.0);
        assert_eq!(mb_per_sec(1, 0.0), 0.0);
    }
}
