//! What `moe` prints: plain-text tables and the run report, in text or as one JSON object.

use crate::error::Result;
use crate::timing::Latency;
use serde::Serialize;
use std::io::Write;

/// Writes `value` as one pretty-printed JSON object and a newline.
pub fn write_json(out: &mut dyn Write, value: &impl Serialize) -> Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Writes a table with a title, left-aligned columns padded to their widest cell.
pub fn write_table(
    out: &mut dyn Write,
    title: &str,
    headers: &[&str],
    rows: &[Vec<String>],
) -> Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    writeln!(out, "{title}")?;
    writeln!(out, "  {}", line(headers.to_vec()))?;
    for row in rows {
        writeln!(out, "  {}", line(row.iter().map(String::as_str).collect()))?;
    }
    writeln!(out)?;
    Ok(())
}

/// The layer's shape as this rank runs it.
#[derive(Clone, Debug, Serialize)]
pub struct Shape {
    /// Routed experts of the model.
    pub experts: usize,
    /// Experts this rank holds (routed share plus fused shared experts).
    pub local_experts: usize,
    pub shared_experts: usize,
    /// Shared experts running as extra routed experts (0 when separate or absent).
    pub fused_shared_experts: usize,
    /// Routed experts per token (the runner sees `top_k + fused_shared_experts`).
    pub top_k: usize,
    pub hidden: usize,
    /// Intermediate size per TP partition.
    pub intermediate: usize,
    pub scheme: String,
    pub tp: usize,
    pub ep: usize,
}

/// The output against the reference path on the same inputs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Accuracy {
    pub rel_l2: f64,
    pub max_abs: f64,
}

/// Everything `moe run` reports.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub model: String,
    pub arch: String,
    /// The runner's description: (format, runner) scheme via path on device.
    pub path: String,
    pub device: String,
    pub runner: String,
    pub a2a: String,
    pub shape: Shape,
    pub weight_bytes: usize,
    pub tokens: usize,
    pub iters: usize,
    pub latency: Latency,
    pub tokens_per_s: f64,
    /// `None` for the reference path itself.
    pub error_vs_reference: Option<Accuracy>,
    /// Choices made for the user (device fallback, fusion turned off).
    pub notes: Vec<String>,
}

impl RunReport {
    pub fn write_text(&self, out: &mut dyn Write) -> Result<()> {
        let s = &self.shape;
        writeln!(out, "model      {} ({})", self.model, self.arch)?;
        let shared = match (s.shared_experts, s.fused_shared_experts) {
            (0, _) => "none".to_string(),
            (n, 0) => format!("{n} separate"),
            (n, _) => format!("{n} fused"),
        };
        writeln!(
            out,
            "shape      E={} local_E={} k={} shared={shared} H={} I={} scheme={} tp={} ep={}",
            s.experts, s.local_experts, s.top_k, s.hidden, s.intermediate, s.scheme, s.tp, s.ep
        )?;
        writeln!(out, "weights    {:.3} GB", self.weight_bytes as f64 / 1e9)?;
        writeln!(out, "device     {}", self.device)?;
        writeln!(out, "path       {} (a2a {})", self.path, self.a2a)?;
        for note in &self.notes {
            writeln!(out, "note       {note}")?;
        }
        writeln!(out, "tokens     {}", self.tokens)?;
        writeln!(
            out,
            "latency    median {:.3} ms, min {:.3} ms over {} iters",
            self.latency.median_ms, self.latency.min_ms, self.iters
        )?;
        writeln!(out, "throughput {:.0} tokens/s", self.tokens_per_s)?;
        match self.error_vs_reference {
            Some(a) => writeln!(
                out,
                "vs ref     rel_l2 {:.3e}, max_abs {:.3e}",
                a.rel_l2, a.max_abs
            )?,
            None => writeln!(out, "vs ref     (this is the reference path)")?,
        }
        Ok(())
    }
}
