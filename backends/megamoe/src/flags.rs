//! The `fp4_acts` / `mxf4_kind` switches: an explicit value in the runner config wins; an unset
//! one takes `MOE_MEGA_FP4_ACTS` / `MOE_MEGA_MXF4_KIND` (read once per process); an unset one
//! with no override follows the weights' scheme (activations) or is off (MXF4 kind).

use moe_runner_core::{MegaMoeFlags, MoeError, Mxfp4Acts, QuantScheme, Result};
use std::sync::OnceLock;

/// The switches in force for one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Resolved {
    /// E2M1 activations (w4a4); otherwise E4M3 (w4a8).
    pub fp4_acts: bool,
    /// FP4 activations kept as FP4 until the MMA.
    pub mxf4_kind: bool,
}

impl Resolved {
    pub fn scheme(self) -> QuantScheme {
        if self.fp4_acts {
            QuantScheme::Mxfp4A4
        } else {
            QuantScheme::Mxfp4A8
        }
    }
}

/// The environment's overrides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnvFlags {
    pub fp4_acts: Option<bool>,
    pub mxf4_kind: Option<bool>,
}

pub const ENV_FP4_ACTS: &str = "MOE_MEGA_FP4_ACTS";
pub const ENV_MXF4_KIND: &str = "MOE_MEGA_MXF4_KIND";

fn parse(name: &str, value: Option<String>) -> std::result::Result<Option<bool>, String> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some("1" | "true" | "on" | "yes") => Ok(Some(true)),
        Some("0" | "false" | "off" | "no") => Ok(Some(false)),
        Some(other) => Err(format!(
            "{name}={other:?}: expected 1/0, true/false, on/off or yes/no"
        )),
    }
}

impl EnvFlags {
    /// Parses the two variables from `get` (the process environment, or a map in tests).
    pub fn read(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let f = |name: &str| parse(name, get(name)).map_err(MoeError::Config);
        Ok(Self {
            fp4_acts: f(ENV_FP4_ACTS)?,
            mxf4_kind: f(ENV_MXF4_KIND)?,
        })
    }

    /// The process's overrides, read on first use and kept.
    pub fn process() -> Result<Self> {
        static ENV: OnceLock<std::result::Result<EnvFlags, String>> = OnceLock::new();
        ENV.get_or_init(|| Self::read(|n| std::env::var(n).ok()).map_err(|e| e.to_string()))
            .clone()
            .map_err(MoeError::Config)
    }
}

/// The activations an unset config would use with no scheme to follow: FP4 when the
/// environment asks for it, FP8 otherwise.
pub fn default_scheme(flags: MegaMoeFlags, env: EnvFlags) -> QuantScheme {
    if flags.fp4_acts.or(env.fp4_acts).unwrap_or(false) {
        QuantScheme::Mxfp4A4
    } else {
        QuantScheme::Mxfp4A8
    }
}

/// The switches for weights of `scheme`: an error when the weights are not MXFP4 with quantized
/// activations, when the activations asked for disagree with them, or when MXF4 kind is asked
/// for without FP4 activations.
pub fn resolve(flags: MegaMoeFlags, env: EnvFlags, scheme: QuantScheme) -> Result<Resolved> {
    let weights_fp4 = match scheme.mxfp4_acts() {
        Some(Mxfp4Acts::Fp4) => true,
        Some(Mxfp4Acts::Fp8) => false,
        _ => {
            return Err(MoeError::UnsupportedScheme {
                runner: crate::RUNNER.into(),
                format: moe_runner_core::DispatchFormat::MegaMoe,
                scheme,
                supported: "mxfp4-w4a4, mxfp4-w4a8".into(),
            })
        }
    };
    let (fp4_acts, from) = match (flags.fp4_acts, env.fp4_acts) {
        (Some(v), _) => (v, "the runner config"),
        (None, Some(v)) => (v, ENV_FP4_ACTS),
        (None, None) => (weights_fp4, "the weights"),
    };
    if fp4_acts != weights_fp4 {
        return Err(MoeError::Config(format!(
            "fp4_acts = {fp4_acts} (from {from}) but the weights are {scheme}, whose activations are {}",
            scheme.activation_format()
        )));
    }
    let mxf4_kind = flags.mxf4_kind.or(env.mxf4_kind).unwrap_or(false);
    if mxf4_kind && !fp4_acts {
        return Err(MoeError::Config(
            "mxf4_kind is the FP4 x FP4 product and needs fp4_acts; with FP8 activations leave it off"
                .into(),
        ));
    }
    Ok(Resolved {
        fp4_acts,
        mxf4_kind,
    })
}
