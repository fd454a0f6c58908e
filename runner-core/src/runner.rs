//! `MoeRunner`: one resolved path from a dispatch output to a combine input. It resolves and
//! builds the path at construction, so a missing combination fails there with the list of what
//! is registered, never at the first forward pass.

use crate::registry::{
    describe_paths, fused_funcs, post_permutes, pre_permutes, registered_paths, runner_cores,
    DeviceKind, FusedRunner, MoeRunnerCore, PathInfo, PathKind, PostPermuteFn, PrePermuteFn,
};
use crate::{
    CombineInput, Device, DispatchFormat, DispatchOutput, MoeError, MoeRunnerConfig, QuantInfo,
    QuantScheme, Result,
};
use tracing::{debug_span, info};

enum ResolvedPath {
    Fused(Box<dyn FusedRunner>),
    Composed {
        pre: PrePermuteFn,
        core: Box<dyn MoeRunnerCore>,
        post: PostPermuteFn,
    },
}

pub struct MoeRunner {
    runner: &'static str,
    format: DispatchFormat,
    scheme: QuantScheme,
    config: MoeRunnerConfig,
    device: Device,
    path: ResolvedPath,
}

impl std::fmt::Debug for MoeRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MoeRunner({})", self.describe())
    }
}

impl MoeRunner {
    /// Builds `runner` for `format` and `scheme` on the device its registration computes on
    /// (the first GPU for CUDA runners).
    pub fn new(
        runner: &str,
        format: DispatchFormat,
        scheme: QuantScheme,
        config: MoeRunnerConfig,
    ) -> Result<Self> {
        // A runner may register a path per device: the preferred one whose device is here.
        let mut paths = Self::lookup_all(runner, format, scheme)?;
        paths.sort_by_key(|p| std::cmp::Reverse(p.priority));
        let mut last = None;
        for info in paths {
            let device = match info.device {
                DeviceKind::Cpu => Ok(Device::cpu()),
                DeviceKind::Cuda => Device::cuda(0),
            };
            match device {
                Ok(d) => return Self::on_device(&d, runner, format, scheme, config),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| MoeError::Device("no device for this runner".into())))
    }

    /// Builds `runner` on a given device (an engine's GPU and stream).
    pub fn on_device(
        device: &Device,
        runner: &str,
        format: DispatchFormat,
        scheme: QuantScheme,
        config: MoeRunnerConfig,
    ) -> Result<Self> {
        config.validate()?;
        let kind = DeviceKind::of(device);
        let paths = Self::lookup_all(runner, format, scheme)?;
        let info = paths
            .iter()
            .find(|p| p.device == kind)
            .cloned()
            .ok_or_else(|| {
                MoeError::invalid(
                    "device",
                    format!(
                        "runner `{runner}` computes on {}, not on {kind}",
                        paths
                            .iter()
                            .map(|p| p.device.to_string())
                            .collect::<Vec<_>>()
                            .join(" and ")
                    ),
                )
            })?;
        let path = match info.kind {
            PathKind::Fused => {
                let f = fused_funcs()
                    .find(|f| f.format == format && f.runner == info.runner && f.device == kind)
                    .expect("registered_paths lists only registered fused funcs");
                ResolvedPath::Fused((f.make)(&config, device)?)
            }
            PathKind::Composed => {
                let pre = pre_permutes()
                    .find(|p| p.format == format && p.runner == info.runner)
                    .expect("registered_paths lists only complete composed paths");
                let core = runner_cores()
                    .find(|c| c.runner == info.runner && c.device == kind)
                    .expect("registered_paths lists only complete composed paths");
                let post = post_permutes()
                    .find(|p| p.format == format && p.runner == info.runner)
                    .expect("registered_paths lists only complete composed paths");
                ResolvedPath::Composed {
                    pre: pre.f,
                    core: (core.make)(&config, device)?,
                    post: post.f,
                }
            }
        };
        info!(runner = info.runner, %format, %scheme, path = %info.kind, "moe runner ready");
        Ok(Self {
            runner: info.runner,
            format,
            scheme,
            config,
            device: device.clone(),
            path,
        })
    }

    /// The preferred registered runner for a format and scheme on this device: the highest
    /// priority among paths that compute on it.
    pub fn auto(
        device: &Device,
        format: DispatchFormat,
        scheme: QuantScheme,
        config: MoeRunnerConfig,
    ) -> Result<Self> {
        let kind = DeviceKind::of(device);
        let best = registered_paths()
            .into_iter()
            .filter(|p| p.format == format && p.device == kind && p.schemes.contains(&scheme))
            .max_by_key(|p| p.priority)
            .ok_or_else(|| MoeError::NoPath {
                runner: "auto".into(),
                format,
                scheme,
                registered: describe_paths(|p| p.format == format),
            })?;
        Self::on_device(device, best.runner, format, scheme, config)
    }

    /// Finds the registered path for the key (the preferred one, when the runner registers
    /// one per device), with errors listing what exists.
    pub fn lookup(runner: &str, format: DispatchFormat, scheme: QuantScheme) -> Result<PathInfo> {
        let mut paths = Self::lookup_all(runner, format, scheme)?;
        paths.sort_by_key(|p| std::cmp::Reverse(p.priority));
        Ok(paths.remove(0))
    }

    /// Every registered path for the key, one per device it computes on; never empty.
    pub fn lookup_all(
        runner: &str,
        format: DispatchFormat,
        scheme: QuantScheme,
    ) -> Result<Vec<PathInfo>> {
        let paths = registered_paths();
        if !paths.iter().any(|p| p.runner == runner) {
            return Err(MoeError::Unknown {
                kind: "runner",
                name: runner.to_string(),
                known: crate::registry::runner_names().join(", "),
            });
        }
        let found: Vec<PathInfo> = paths
            .into_iter()
            .filter(|p| p.runner == runner && p.format == format)
            .collect();
        let Some(first) = found.first() else {
            return Err(MoeError::NoPath {
                runner: runner.to_string(),
                format,
                scheme,
                registered: describe_paths(|p| p.runner == runner || p.format == format),
            });
        };
        if !found.iter().any(|p| p.schemes.contains(&scheme)) {
            return Err(MoeError::UnsupportedScheme {
                runner: runner.to_string(),
                format,
                scheme,
                supported: crate::scheme_list(first.schemes),
            });
        }
        Ok(found
            .into_iter()
            .filter(|p| p.schemes.contains(&scheme))
            .collect())
    }

    pub fn runner(&self) -> &'static str {
        self.runner
    }
    pub fn format(&self) -> DispatchFormat {
        self.format
    }
    pub fn scheme(&self) -> QuantScheme {
        self.scheme
    }
    pub fn config(&self) -> &MoeRunnerConfig {
        &self.config
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn path_kind(&self) -> PathKind {
        match self.path {
            ResolvedPath::Fused(_) => PathKind::Fused,
            ResolvedPath::Composed { .. } => PathKind::Composed,
        }
    }

    /// "(format, runner) scheme via path on device".
    pub fn describe(&self) -> String {
        use crate::DeviceOps;
        format!(
            "({}, {}) {} via {} on {}",
            self.format,
            self.runner,
            self.scheme,
            self.path_kind(),
            self.device.name()
        )
    }

    /// Runs the experts on one dispatch output.
    /// Runs into `out`, memory the caller owns: the standard format's `[M, H]` output (or the
    /// masked format's `[E_local, R*T, H]`), with no allocation once warm. Fused GPU paths do;
    /// the composed CPU path returns an error that says to call [`Self::run`].
    pub fn run_into(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
        out: &crate::Tensor,
    ) -> Result<()> {
        if input.format() != self.format {
            return Err(MoeError::FormatMismatch {
                runner: self.runner.into(),
                expected: self.format,
                got: input.format(),
            });
        }
        match &self.path {
            ResolvedPath::Fused(f) => f.run_into(input, quant, out),
            ResolvedPath::Composed { .. } => Err(MoeError::invalid(
                "out",
                format!(
                    "the composed path of `{}` allocates its output; call run",
                    self.runner
                ),
            )),
        }
    }

    pub fn run(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
    ) -> Result<Box<dyn CombineInput>> {
        let _span = debug_span!(
            "moe_runner.run",
            runner = self.runner,
            tokens = input.num_tokens()
        )
        .entered();
        if input.format() != self.format {
            return Err(MoeError::FormatMismatch {
                runner: self.runner.to_string(),
                expected: self.format,
                got: input.format(),
            });
        }
        if quant.scheme() != self.scheme {
            return Err(MoeError::QuantMismatch {
                expected: self.scheme.to_string(),
                got: quant.scheme().to_string(),
            });
        }
        if input.hidden_size() != self.config.hidden_size {
            return Err(MoeError::Shape {
                what: "hidden size of the dispatch output".into(),
                expected: vec![self.config.hidden_size],
                got: vec![input.hidden_size()],
            });
        }
        match &self.path {
            ResolvedPath::Fused(f) => f.run(input, quant),
            ResolvedPath::Composed { pre, core, post } => {
                let x = {
                    let _s = debug_span!("pre_permute").entered();
                    pre(input, quant, &self.config)?
                };
                let y = {
                    let _s = debug_span!("runner_core").entered();
                    core.run(x, quant)?
                };
                let _s = debug_span!("post_permute").entered();
                post(y, input, &self.config)
            }
        }
    }
}
