//! Kernels are CUDA C compiled at run time by NVRTC for the device's architecture (sm_90a on
//! Hopper), once per process per (source, options, architecture), and cached on disk as PTX
//! keyed by a hash of the three, so a second process skips NVRTC entirely.

use crate::{CudaDevice, MoeError, Result};
use cudarc::driver::CudaModule;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

/// The NVRTC target of a device: `sm_90a` on Hopper (wgmma and setmaxnreg need the `a` form),
/// `sm_XY` elsewhere.
pub fn target_arch(dev: &CudaDevice) -> Result<String> {
    let (major, minor) = dev.compute_capability()?;
    Ok(if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    })
}

/// Where PTX is cached: `$MOE_KERNEL_CACHE_DIR`, else `$XDG_CACHE_HOME/moe-runner/kernels`, else
/// `$HOME/.cache/moe-runner/kernels`, else the system temp dir.
pub fn kernel_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MOE_KERNEL_CACHE_DIR") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("moe-runner").join("kernels")
}

/// 64-bit FNV-1a: stable across builds and platforms, which a disk cache key must be.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter().chain(&[0xffu8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

type ModuleKey = (u64, usize);

fn loaded() -> &'static Mutex<HashMap<ModuleKey, Arc<CudaModule>>> {
    static LOADED: OnceLock<Mutex<HashMap<ModuleKey, Arc<CudaModule>>>> = OnceLock::new();
    LOADED.get_or_init(Default::default)
}

/// Compiles (or fetches) `source` with `-D` `defines` for `dev` and loads it into its context.
/// `name` only labels errors and logs.
pub fn compile_module(
    dev: &CudaDevice,
    name: &str,
    source: &str,
    defines: &[(&str, String)],
) -> Result<Arc<CudaModule>> {
    let arch = target_arch(dev)?;
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
    ];
    let mut defs: Vec<String> = defines.iter().map(|(k, v)| format!("-D{k}={v}")).collect();
    defs.sort();
    options.extend(defs);
    let joined = options.join(" ");
    let key = fnv1a(&[source.as_bytes(), joined.as_bytes(), arch.as_bytes()]);
    let ordinal = dev.context().ordinal();
    let mut map = loaded()
        .lock()
        .map_err(|_| MoeError::Device("kernel cache lock poisoned".into()))?;
    if let Some(m) = map.get(&(key, ordinal)) {
        return Ok(m.clone());
    }
    let path = kernel_cache_dir().join(format!("{name}-{key:016x}.ptx"));
    let ptx_src = match std::fs::read_to_string(&path) {
        Ok(src) => {
            tracing::debug!(kernel = name, path = %path.display(), "PTX from the disk cache");
            src
        }
        Err(_) => {
            let started = std::time::Instant::now();
            let ptx = compile_ptx_with_opts(
                source,
                CompileOptions {
                    options: options.clone(),
                    ..Default::default()
                },
            )
            .map_err(|e| MoeError::Kernel {
                name: name.to_string(),
                log: format!("{e:?}"),
            })?;
            tracing::info!(kernel = name, options = %joined, ms = started.elapsed().as_millis() as u64, "compiled with NVRTC");
            let src = ptx.to_src();
            // Best effort: a read-only cache directory only costs the next process a compile.
            if std::fs::create_dir_all(path.parent().unwrap_or(&path)).is_ok() {
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, &src).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
            }
            src
        }
    };
    let module = dev
        .context()
        .load_module(Ptx::from_src(ptx_src))
        .map_err(|e| MoeError::Kernel {
            name: name.to_string(),
            log: format!("loading the PTX failed: {e}"),
        })?;
    map.insert((key, ordinal), module.clone());
    Ok(module)
}
