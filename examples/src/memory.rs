//! Checks that a layer's weights fit in host memory before generating them, so a big preset on
//! a small machine fails at once with what it needs instead of being killed half-way.

use crate::error::{CliError, Result};

const GB: f64 = 1e9;

/// `MemAvailable` from /proc/meminfo in bytes, or `None` where that file is missing or has an
/// unexpected form (non-Linux systems): the check is then skipped.
pub fn available_bytes() -> Option<u64> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut parts = line.split_whitespace().skip(1);
    let value: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

/// Fails with [`CliError::OutOfMemory`] when `need` bytes exceed `available` (when known).
pub fn check_fits(need: usize, available: Option<u64>) -> Result<()> {
    match available {
        Some(avail) if need as u64 > avail => Err(CliError::OutOfMemory {
            need_gb: need as f64 / GB,
            available_gb: avail as f64 / GB,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available() {
        let text = "MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   24354592 kB\n";
        assert_eq!(parse_meminfo(text), Some(24354592 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemAvailable: lots\n"), None);
    }

    #[test]
    fn too_big_says_how_much_and_what_to_try() {
        assert!(check_fits(10, Some(20)).is_ok());
        assert!(check_fits(10, None).is_ok());
        let err = check_fits(12_000_000_000, Some(8_000_000_000))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("12.0 GB")
                && err.contains("8.0 GB")
                && err.contains("--ep")
                && err.contains("--scheme"),
            "{err}"
        );
    }
}
