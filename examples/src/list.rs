//! `moe list`: what the linked backends registered, so a user sees which runner, format and
//! scheme combinations `moe run` (and an engine) can pick.

use crate::cli::ListArgs;
use crate::error::Result;
use crate::output::{write_json, write_table};
use moe_dispatch::a2a_backends;
use moe_runner_core::registry::{registered_paths, runner_names};
use moe_runner_core::{DispatchFormat, PathKind, QuantScheme};
use serde::Serialize;
use std::io::Write;

#[derive(Debug, Serialize)]
pub struct A2aEntry {
    pub name: &'static str,
    pub format: String,
    pub description: &'static str,
}

#[derive(Debug, Serialize)]
pub struct PathEntry {
    pub format: String,
    pub runner: &'static str,
    /// `fused` or `composed` (pre-permute + core + post-permute).
    pub kind: &'static str,
    pub device: String,
    pub priority: i32,
    pub schemes: Vec<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct SchemeEntry {
    pub name: &'static str,
    pub weights: &'static str,
    pub activations: &'static str,
}

/// The registries' contents.
#[derive(Debug, Serialize)]
pub struct Listing {
    pub a2a_backends: Vec<A2aEntry>,
    pub dispatch_formats: Vec<&'static str>,
    pub runners: Vec<&'static str>,
    pub paths: Vec<PathEntry>,
    pub quant_schemes: Vec<SchemeEntry>,
}

impl Listing {
    pub fn collect() -> Self {
        let mut a2a_backends: Vec<A2aEntry> = a2a_backends()
            .map(|b| A2aEntry {
                name: b.name,
                format: b.format.to_string(),
                description: b.description,
            })
            .collect();
        a2a_backends.sort_by_key(|b| b.name);
        let paths = registered_paths()
            .into_iter()
            .map(|p| PathEntry {
                format: p.format.to_string(),
                runner: p.runner,
                kind: match p.kind {
                    PathKind::Fused => "fused",
                    PathKind::Composed => "composed",
                },
                device: p.device.to_string(),
                priority: p.priority,
                schemes: p.schemes.iter().map(|s| s.name()).collect(),
            })
            .collect();
        Self {
            a2a_backends,
            dispatch_formats: DispatchFormat::BUILTIN.iter().map(|f| f.name()).collect(),
            runners: runner_names(),
            paths,
            quant_schemes: QuantScheme::ALL
                .iter()
                .map(|s| SchemeEntry {
                    name: s.name(),
                    weights: s.weight_format(),
                    activations: s.activation_format(),
                })
                .collect(),
        }
    }

    pub fn write_text(&self, out: &mut dyn Write) -> Result<()> {
        let a2a: Vec<Vec<String>> = self
            .a2a_backends
            .iter()
            .map(|b| vec![b.name.into(), b.format.clone(), b.description.into()])
            .collect();
        write_table(
            out,
            "a2a backends",
            &["name", "format", "description"],
            &a2a,
        )?;
        writeln!(
            out,
            "dispatch formats: {}",
            self.dispatch_formats.join(", ")
        )?;
        writeln!(out, "runners: {}\n", self.runners.join(", "))?;
        let paths: Vec<Vec<String>> = self
            .paths
            .iter()
            .map(|p| {
                vec![
                    p.format.clone(),
                    p.runner.into(),
                    p.kind.into(),
                    p.device.clone(),
                    p.priority.to_string(),
                    p.schemes.join(", "),
                ]
            })
            .collect();
        write_table(
            out,
            "paths",
            &["format", "runner", "kind", "device", "priority", "schemes"],
            &paths,
        )?;
        let schemes: Vec<Vec<String>> = self
            .quant_schemes
            .iter()
            .map(|s| vec![s.name.into(), s.weights.into(), s.activations.into()])
            .collect();
        write_table(
            out,
            "quant schemes",
            &["name", "weights", "activations"],
            &schemes,
        )
    }
}

pub fn list(args: &ListArgs, out: &mut dyn Write) -> Result<()> {
    let listing = Listing::collect();
    if args.json {
        write_json(out, &listing)
    } else {
        listing.write_text(out)
    }
}
