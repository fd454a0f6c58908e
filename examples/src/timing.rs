//! Latency statistics of the timed forward passes.

use serde::Serialize;
use std::time::Duration;

/// Median and minimum over the timed iterations, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Latency {
    pub median_ms: f64,
    pub min_ms: f64,
}

impl Latency {
    /// Summarizes `times`; `None` when there are none.
    pub fn of(times: &[Duration]) -> Option<Self> {
        let mut ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => ms[n / 2],
            _ => (ms[n / 2 - 1] + ms[n / 2]) / 2.0,
        };
        Some(Self {
            median_ms: median,
            min_ms: ms[0],
        })
    }

    /// Tokens per second at the median latency.
    pub fn tokens_per_s(&self, tokens: usize) -> f64 {
        if self.median_ms > 0.0 {
            tokens as f64 / (self.median_ms / 1e3)
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_min() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&x| Duration::from_millis(x))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            Latency::of(&ms(&[5, 1, 3])),
            Some(Latency {
                median_ms: 3.0,
                min_ms: 1.0
            })
        );
        assert_eq!(
            Latency::of(&ms(&[4, 2])),
            Some(Latency {
                median_ms: 3.0,
                min_ms: 2.0
            })
        );
        assert_eq!(Latency::of(&[]), None);
        assert_eq!(
            Latency {
                median_ms: 2.0,
                min_ms: 1.0
            }
            .tokens_per_s(64),
            32000.0
        );
    }
}
