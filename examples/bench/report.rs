//! Collecting figures over rounds and writing them up: medians with
//! min..max over the rounds, ratios and differences taken within a round.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Percentile `p` (0..=100) of unsorted nanosecond samples, in ms.
pub fn percentile_ms(samples: &mut [u64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1] as f64 / 1e6
}

/// One scenario on one target in one round.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: &'static str,
    pub target: String,
    pub round: usize,
    pub values: BTreeMap<&'static str, f64>,
    /// Why the run does not count, if it does not.
    pub failed: Option<String>,
}

/// Median, min and max of a series.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn summarize(mut v: Vec<f64>) -> Option<Summary> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

#[derive(Default)]
pub struct Results {
    pub rows: Vec<Row>,
}

impl Results {
    fn value(&self, scenario: &str, target: &str, round: usize, metric: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| {
                r.scenario == scenario
                    && r.target == target
                    && r.round == round
                    && r.failed.is_none()
            })
            .and_then(|r| r.values.get(metric).copied())
    }

    fn rounds(&self) -> Vec<usize> {
        let mut rounds: Vec<usize> = self.rows.iter().map(|r| r.round).collect();
        rounds.sort_unstable();
        rounds.dedup();
        rounds
    }

    /// A metric of one target over the rounds that counted.
    pub fn series(&self, scenario: &str, target: &str, metric: &str) -> Option<Summary> {
        let v = self
            .rounds()
            .into_iter()
            .filter_map(|round| self.value(scenario, target, round, metric))
            .collect();
        summarize(v)
    }

    /// `f(a, b)` of two targets' metric, round by round.
    pub fn paired(
        &self,
        scenario: &str,
        metric: &str,
        a: &str,
        b: &str,
        f: fn(f64, f64) -> f64,
    ) -> Option<Summary> {
        let v = self
            .rounds()
            .into_iter()
            .filter_map(|round| {
                let x = self.value(scenario, a, round, metric)?;
                let y = self.value(scenario, b, round, metric)?;
                Some(f(x, y))
            })
            .collect();
        summarize(v)
    }

    pub fn failures(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.failed.is_some()).collect()
    }

    /// Total of a metric over every counted run of a scenario and target.
    pub fn total(&self, scenario: &str, target: &str, metric: &str) -> f64 {
        self.rows
            .iter()
            .filter(|r| r.scenario == scenario && r.target == target && r.failed.is_none())
            .filter_map(|r| r.values.get(metric))
            .sum()
    }
}

/// `median (min..max)` with `digits` decimals.
pub fn fmt(s: Option<Summary>, digits: usize) -> String {
    match s {
        None => "—".into(),
        Some(s) if s.n == 1 => format!("{:.*}", digits, s.median),
        Some(s) => format!(
            "{:.*} ({:.*}..{:.*})",
            digits, s.median, digits, s.min, digits, s.max
        ),
    }
}

/// A markdown table.
pub fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(
        out,
        "|{}",
        header.iter().map(|_| "---|").collect::<String>()
    );
    for row in rows {
        let _ = writeln!(out, "| {} |", row.join(" | "));
    }
    out.push('\n');
}
