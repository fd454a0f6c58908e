//! The open set of backends. Backend crates `inventory::submit!` these entries; the framework
//! never names a backend. Two paths lead from a dispatch output to a combine input:
//! a [`FusedFunc`] for the pair (format, runner), or the composable
//! [`PrePermute`] -> [`RunnerCore`] -> [`PostPermute`] chain. Lookups that fail list what *is*
//! registered so the error tells the user what to pick instead.

use crate::{
    CombineInput, Device, DispatchFormat, DispatchOutput, MoeError, MoeRunnerConfig, QuantInfo,
    QuantScheme, Result,
};
use std::any::Any;
use std::fmt;

/// Where a registered function computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    pub fn of(device: &Device) -> Self {
        match device {
            Device::Cpu(_) => DeviceKind::Cpu,
            Device::Cuda(_) => DeviceKind::Cuda,
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        })
    }
}

/// A built fused runner: its per-runner state (workspaces, compiled kernels) lives inside.
pub trait FusedRunner: Send + Sync {
    fn run(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
    ) -> Result<Box<dyn CombineInput>>;

    /// Writes the combine input into `out`, memory the caller owns (the engine's output), with
    /// no allocation once warm. Runners that cannot say so.
    fn run_into(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
        out: &crate::Tensor,
    ) -> Result<()> {
        let _ = (input, quant, out);
        Err(MoeError::invalid(
            "out",
            "this runner allocates its output; call run",
        ))
    }
}

/// The whole path from one format's dispatch output to its combine input.
pub struct FusedFunc {
    pub format: DispatchFormat,
    pub runner: &'static str,
    pub schemes: &'static [QuantScheme],
    pub device: DeviceKind,
    /// Higher is preferred by `auto` selection among paths for the same device.
    pub priority: i32,
    pub make: fn(&MoeRunnerConfig, &Device) -> Result<Box<dyn FusedRunner>>,
}
inventory::collect!(FusedFunc);

/// The typed per-call value passed between pre-permute, core and post-permute. Each runner
/// defines its own concrete input and output types; a mismatch is an error, not a panic.
pub type RunnerIo = Box<dyn Any + Send>;

/// Takes a runner's concrete per-call type out of a [`RunnerIo`].
pub fn downcast_io<T: Any>(io: RunnerIo, stage: &str) -> Result<Box<T>> {
    io.downcast::<T>().map_err(|_| MoeError::Invalid {
        what: stage.to_string(),
        msg: format!("expected a {}", std::any::type_name::<T>()),
    })
}

/// A pre-permute: one format's dispatch output to a runner's input.
pub type PrePermuteFn =
    fn(&dyn DispatchOutput, &dyn QuantInfo, &MoeRunnerConfig) -> Result<RunnerIo>;
/// A post-permute: a runner's output to one format's combine input.
pub type PostPermuteFn =
    fn(RunnerIo, &dyn DispatchOutput, &MoeRunnerConfig) -> Result<Box<dyn CombineInput>>;

/// Turns one format's dispatch output into a runner's input.
pub struct PrePermute {
    pub format: DispatchFormat,
    pub runner: &'static str,
    pub f: PrePermuteFn,
}
inventory::collect!(PrePermute);

/// A built runner core: the expert computation on the runner's own input layout.
pub trait MoeRunnerCore: Send + Sync {
    fn run(&self, input: RunnerIo, quant: &dyn QuantInfo) -> Result<RunnerIo>;
}

pub struct RunnerCore {
    pub runner: &'static str,
    pub schemes: &'static [QuantScheme],
    pub device: DeviceKind,
    pub priority: i32,
    pub make: fn(&MoeRunnerConfig, &Device) -> Result<Box<dyn MoeRunnerCore>>,
}
inventory::collect!(RunnerCore);

/// Turns a runner's output into one format's combine input.
pub struct PostPermute {
    pub runner: &'static str,
    pub format: DispatchFormat,
    pub f: PostPermuteFn,
}
inventory::collect!(PostPermute);

pub fn fused_funcs() -> impl Iterator<Item = &'static FusedFunc> {
    inventory::iter::<FusedFunc>.into_iter()
}
pub fn pre_permutes() -> impl Iterator<Item = &'static PrePermute> {
    inventory::iter::<PrePermute>.into_iter()
}
pub fn runner_cores() -> impl Iterator<Item = &'static RunnerCore> {
    inventory::iter::<RunnerCore>.into_iter()
}
pub fn post_permutes() -> impl Iterator<Item = &'static PostPermute> {
    inventory::iter::<PostPermute>.into_iter()
}

/// How a (format, runner) pair is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    Fused,
    /// Pre-permute, runner core, post-permute.
    Composed,
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathKind::Fused => "fused",
            PathKind::Composed => "pre-permute + core + post-permute",
        })
    }
}

/// One runnable (format, runner) combination.
#[derive(Clone, Debug)]
pub struct PathInfo {
    pub format: DispatchFormat,
    pub runner: &'static str,
    pub schemes: &'static [QuantScheme],
    pub device: DeviceKind,
    pub priority: i32,
    pub kind: PathKind,
}

impl fmt::Display for PathInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "({}, {}) [{}] on {} via {}",
            self.format,
            self.runner,
            crate::scheme_list(self.schemes),
            self.device,
            self.kind
        )
    }
}

/// Every runnable combination: the fused functions, then each runner core joined with the
/// pre- and post-permutes registered for it, one entry per format they both cover. A fused
/// function shadows a composed path of the same key.
pub fn registered_paths() -> Vec<PathInfo> {
    let mut paths: Vec<PathInfo> = fused_funcs()
        .map(|f| PathInfo {
            format: f.format,
            runner: f.runner,
            schemes: f.schemes,
            device: f.device,
            priority: f.priority,
            kind: PathKind::Fused,
        })
        .collect();
    for core in runner_cores() {
        for pre in pre_permutes().filter(|p| p.runner == core.runner) {
            let has_post =
                post_permutes().any(|p| p.runner == core.runner && p.format == pre.format);
            let shadowed = paths.iter().any(|p| {
                p.kind == PathKind::Fused && p.runner == core.runner && p.format == pre.format
            });
            if has_post && !shadowed {
                paths.push(PathInfo {
                    format: pre.format,
                    runner: core.runner,
                    schemes: core.schemes,
                    device: core.device,
                    priority: core.priority,
                    kind: PathKind::Composed,
                });
            }
        }
    }
    paths.sort_by_key(|p| (p.format, p.runner));
    paths
}

/// Every registered runner name.
pub fn runner_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = fused_funcs()
        .map(|f| f.runner)
        .chain(runner_cores().map(|c| c.runner))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Keys registered more than once, which would make lookups ambiguous.
pub fn duplicate_keys() -> Vec<String> {
    fn dups<K: Ord + Clone + fmt::Debug>(mut keys: Vec<K>, what: &str) -> Vec<String> {
        keys.sort();
        keys.windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| format!("{what} {:?}", w[0]))
            .collect()
    }
    // A runner may register one path per device (its CPU path and its GPU kernels).
    let mut out = dups(
        fused_funcs()
            .map(|f| (f.format, f.runner, f.device))
            .collect(),
        "fused func",
    );
    out.extend(dups(
        pre_permutes().map(|p| (p.format, p.runner)).collect(),
        "pre-permute",
    ));
    out.extend(dups(
        runner_cores().map(|c| (c.runner, c.device)).collect(),
        "runner core",
    ));
    out.extend(dups(
        post_permutes().map(|p| (p.runner, p.format)).collect(),
        "post-permute",
    ));
    out.dedup();
    out
}

/// The registered paths as one line each, for error messages.
pub(crate) fn describe_paths(filter: impl Fn(&PathInfo) -> bool) -> String {
    let lines: Vec<String> = registered_paths()
        .iter()
        .filter(|p| filter(p))
        .map(|p| p.to_string())
        .collect();
    if lines.is_empty() {
        "nothing".to_string()
    } else {
        lines.join("; ")
    }
}
