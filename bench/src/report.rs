//! Results: one JSON file per server, and the side-by-side table.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Higher,
    Lower,
    /// Not a figure of the server's (the generator's own cost): no advantage.
    Neither,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Metric {
    pub key: String,
    pub name: String,
    pub unit: String,
    pub better: Better,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: usize,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub label: String,
    pub url: String,
    pub metrics: Vec<Metric>,
}

/// Median, min and max of samples.
pub fn summarize(samples: &[f64]) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let mid = s.len() / 2;
    let median = if s.len().is_multiple_of(2) {
        (s[mid - 1] + s[mid]) / 2.0
    } else {
        s[mid]
    };
    (median, s[0], s[s.len() - 1])
}

/// The `p`th percentile (0–100) of samples.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[rank.min(s.len() - 1)]
}

impl Report {
    pub fn add(&mut self, key: &str, name: &str, unit: &str, better: Better, samples: &[f64]) {
        let (median, min, max) = summarize(samples);
        println!(
            "  {name:<46} {median:>12.3} {unit:<8} (min {min:.3}, max {max:.3}, n={})",
            samples.len()
        );
        self.metrics.push(Metric {
            key: key.into(),
            name: name.into(),
            unit: unit.into(),
            better,
            median,
            min,
            max,
            samples: samples.len(),
        });
    }
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "—".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

pub fn compare(baseline: &Path, candidate: &Path) -> anyhow::Result<()> {
    let a: Report = serde_json::from_slice(&std::fs::read(baseline)?)?;
    let b: Report = serde_json::from_slice(&std::fs::read(candidate)?)?;
    println!(
        "| figure | unit | {} (median, min–max) | {} (median, min–max) | {} advantage |",
        a.label, b.label, b.label
    );
    println!("| --- | --- | --- | --- | --- |");
    for m in &b.metrics {
        let base = a.metrics.iter().find(|x| x.key == m.key);
        let (base_cell, advantage) = match base {
            Some(x) => {
                let adv = match m.better {
                    Better::Higher => m.median / x.median,
                    Better::Lower => x.median / m.median,
                    Better::Neither => f64::NAN,
                };
                (
                    format!("{} ({}–{})", fmt(x.median), fmt(x.min), fmt(x.max)),
                    if adv.is_finite() {
                        format!("{adv:.1}×")
                    } else {
                        "—".into()
                    },
                )
            }
            None => ("—".into(), "—".into()),
        };
        println!(
            "| {} | {} | {} | {} ({}–{}) | {} |",
            m.name,
            m.unit,
            base_cell,
            fmt(m.median),
            fmt(m.min),
            fmt(m.max),
            advantage
        );
    }
    Ok(())
}
