//! Tile configurations in the JSON schema SGLang and vLLM use, so users can bring the files
//! they already tuned: one file per (E, N, device[, dtype][, block shape]), keys are batch
//! sizes M, values the tile sizes; the entry of the nearest M is used.

use moe_runner_core::{MoeError, QuantScheme, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One entry of a tuned-config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TileConfig {
    #[serde(rename = "BLOCK_SIZE_M")]
    pub block_m: usize,
    #[serde(rename = "BLOCK_SIZE_N")]
    pub block_n: usize,
    #[serde(rename = "BLOCK_SIZE_K")]
    pub block_k: usize,
    #[serde(rename = "GROUP_SIZE_M")]
    pub group_m: usize,
    pub num_warps: usize,
    pub num_stages: usize,
}

/// Environment variable naming the directory of tuned-config files.
pub const CONFIG_DIR_ENV: &str = "MOE_TUNED_CONFIG_DIR";

/// The file name SGLang and vLLM use: `E={E},N={N},device_name={name}[,dtype=fp8_w8a8][,block_shape=[128,128]].json`
/// with N the intermediate size per partition and spaces in the device name as underscores.
pub fn config_file_name(
    experts: usize,
    n: usize,
    device_name: &str,
    scheme: QuantScheme,
) -> String {
    let device = device_name.replace(' ', "_");
    let dtype = match scheme {
        QuantScheme::Fp8Block128 => ",dtype=fp8_w8a8,block_shape=[128,128]",
        QuantScheme::Fp8PerTensor | QuantScheme::Fp8PerChannel => ",dtype=fp8_w8a8",
        _ => "",
    };
    format!("E={experts},N={n},device_name={device}{dtype}.json")
}

/// A parsed tuned-config file: M -> tiles.
#[derive(Clone, Debug, PartialEq)]
pub struct TunedConfigs {
    pub path: PathBuf,
    pub by_m: BTreeMap<usize, TileConfig>,
}

impl TunedConfigs {
    /// Parses a file; errors name the file and the key that is wrong.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let bad = |msg: String| MoeError::invalid(format!("tuned config {}", path.display()), msg);
        let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(text)
            .map_err(|e| bad(format!("not a JSON object of batch sizes: {e}")))?;
        let mut by_m = BTreeMap::new();
        for (key, value) in raw {
            let m: usize = key
                .parse()
                .map_err(|_| bad(format!("key `{key}` is not a batch size")))?;
            let tile: TileConfig =
                serde_json::from_value(value).map_err(|e| bad(format!("entry `{key}`: {e}")))?;
            by_m.insert(m, tile);
        }
        if by_m.is_empty() {
            return Err(bad("no entries".into()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            by_m,
        })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            MoeError::invalid(format!("tuned config {}", path.display()), e.to_string())
        })?;
        Self::parse(path, &text)
    }

    /// The entry whose M is nearest to `m` (ties to the smaller).
    pub fn nearest(&self, m: usize) -> TileConfig {
        *self
            .by_m
            .iter()
            .min_by_key(|(k, _)| (k.abs_diff(m), **k))
            .map(|(_, v)| v)
            .expect("parse rejects empty files")
    }

    pub fn to_json(&self) -> String {
        let map: BTreeMap<String, TileConfig> =
            self.by_m.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        serde_json::to_string_pretty(&map).expect("tile configs serialize")
    }
}

/// Tuned files shipped in the binary (`configs/` of this crate, written by `moe tune`).
const SHIPPED: &[(&str, &str)] = &[
    ("E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json", include_str!("../configs/E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json")),
    ("E=128,N=768,device_name=NVIDIA_H200.json", include_str!("../configs/E=128,N=768,device_name=NVIDIA_H200.json")),
    ("E=256,N=2048,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json", include_str!("../configs/E=256,N=2048,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json")),
    ("E=256,N=2048,device_name=NVIDIA_H100_80GB_HBM3.json", include_str!("../configs/E=256,N=2048,device_name=NVIDIA_H100_80GB_HBM3.json")),
    ("E=256,N=2048,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json", include_str!("../configs/E=256,N=2048,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json")),
    ("E=256,N=2048,device_name=NVIDIA_H200.json", include_str!("../configs/E=256,N=2048,device_name=NVIDIA_H200.json")),
    ("E=257,N=2048,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json", include_str!("../configs/E=257,N=2048,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json")),
    ("E=257,N=2048,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json", include_str!("../configs/E=257,N=2048,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json")),
    ("E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3.json", include_str!("../configs/E=8,N=14336,device_name=NVIDIA_H100_80GB_HBM3.json")),
    ("E=8,N=14336,device_name=NVIDIA_H200.json", include_str!("../configs/E=8,N=14336,device_name=NVIDIA_H200.json")),
];

/// Directories searched for tuned configs before the shipped ones: the explicit one, then
/// `$MOE_TUNED_CONFIG_DIR`.
pub fn search_dirs(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = explicit.map(Path::to_path_buf).into_iter().collect();
    if let Some(d) = std::env::var_os(CONFIG_DIR_ENV) {
        dirs.push(PathBuf::from(d));
    }
    dirs
}

/// Finds and loads the tuned file for this shape from `dirs`, then from the shipped files, or
/// `None` (the caller logs and uses [`default_tile`]).
pub fn find_tuned(dirs: &[PathBuf], file_name: &str) -> Result<Option<TunedConfigs>> {
    for d in dirs {
        let p = d.join(file_name);
        if p.is_file() {
            return TunedConfigs::load(&p).map(Some);
        }
    }
    SHIPPED
        .iter()
        .find(|(name, _)| *name == file_name)
        .map(|(name, text)| TunedConfigs::parse(Path::new(&format!("shipped:{name}")), text))
        .transpose()
}

/// A sensible tile when no tuned file exists, by rows per expert: small blocks that stream the
/// weights for decode, larger ones that reuse them for prefill.
pub fn default_tile(numel: usize, experts: usize, scheme: QuantScheme) -> TileConfig {
    let per_expert = numel / experts.max(1);
    let fp8 = matches!(
        scheme,
        QuantScheme::Fp8Block128 | QuantScheme::Fp8PerTensor | QuantScheme::Fp8PerChannel
    );
    let block_k = if fp8 { 128 } else { 64 };
    let (block_m, block_n, num_warps, num_stages) = match per_expert {
        0..=16 => (16, 64, 4, 4),
        17..=64 => (32, 128, 4, 4),
        65..=256 => (64, 128, 4, 3),
        _ => (128, 128, 8, 3),
    };
    TileConfig {
        block_m,
        block_n,
        block_k,
        group_m: if per_expert > 16 { 8 } else { 1 },
        num_warps,
        num_stages,
    }
}

/// Chooses the tile of a batch for one layer shape: a forced tile (the tuner and tests sweep
/// tiles), else the nearest entry of the tuned file for (E, N, device, scheme), else the default
/// (logged once when no file exists). The file is looked up once, at the first batch.
pub struct TileSelector {
    experts: usize,
    inter: usize,
    device_name: String,
    config_dir: Option<PathBuf>,
    forced: std::sync::Mutex<Option<TileConfig>>,
    tuned: std::sync::Mutex<Option<Option<TunedConfigs>>>,
}

impl TileSelector {
    pub fn new(
        experts: usize,
        inter: usize,
        device_name: String,
        config_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            experts,
            inter,
            device_name,
            config_dir,
            forced: Default::default(),
            tuned: Default::default(),
        }
    }

    /// Uses `tile` for every batch until cleared with `None`.
    pub fn force(&self, tile: Option<TileConfig>) -> Result<()> {
        *self.forced.lock().map_err(|_| poisoned())? = tile;
        Ok(())
    }

    /// The tile for `m` tokens whose `numel` (token, expert) rows spread over the experts.
    pub fn tile_for(&self, m: usize, numel: usize, scheme: QuantScheme) -> Result<TileConfig> {
        if let Some(t) = *self.forced.lock().map_err(|_| poisoned())? {
            return Ok(t);
        }
        let mut tuned = self.tuned.lock().map_err(|_| poisoned())?;
        if tuned.is_none() {
            let name = config_file_name(self.experts, self.inter, &self.device_name, scheme);
            let found = find_tuned(&search_dirs(self.config_dir.as_deref()), &name)?;
            match &found {
                Some(c) => tracing::info!(file = %c.path.display(), "tuned MoE configs"),
                None => {
                    tracing::info!(file = %name, "no tuned MoE config file; using default tiles")
                }
            }
            *tuned = Some(found);
        }
        Ok(match tuned.as_ref().and_then(|t| t.as_ref()) {
            Some(t) => t.nearest(m),
            None => default_tile(numel, self.experts, scheme),
        })
    }
}

fn poisoned() -> MoeError {
    MoeError::Device("tile selector lock poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{
        "1": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1, "num_warps": 4, "num_stages": 4},
        "64": {"BLOCK_SIZE_M": 32, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 8, "num_warps": 4, "num_stages": 3}
    }"#;

    #[test]
    fn parses_the_sglang_schema_and_picks_the_nearest_m() {
        let c = TunedConfigs::parse(Path::new("x.json"), SAMPLE).unwrap();
        assert_eq!(c.nearest(1).block_m, 16);
        assert_eq!(c.nearest(20).block_m, 16);
        assert_eq!(c.nearest(40).block_m, 32);
        assert_eq!(c.nearest(4096).block_n, 128);
        let again = TunedConfigs::parse(Path::new("x.json"), &c.to_json()).unwrap();
        assert_eq!(again.by_m, c.by_m);
    }

    #[test]
    fn bad_files_name_the_file_and_key() {
        let e = TunedConfigs::parse(Path::new("cfg.json"), "{not json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cfg.json"), "{e}");
        let e = TunedConfigs::parse(Path::new("cfg.json"), r#"{"8": {"BLOCK_SIZE_M": 16}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("entry `8`") && e.contains("BLOCK_SIZE_N"), "{e}");
        let e = TunedConfigs::parse(Path::new("cfg.json"), r#"{"eight": {}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`eight`"), "{e}");
    }

    #[test]
    fn shipped_files_parse_and_are_found() {
        assert!(!SHIPPED.is_empty());
        for (name, _) in SHIPPED {
            let c = find_tuned(&[], name)
                .unwrap()
                .expect("shipped file is found");
            assert!(
                c.by_m.contains_key(&1) && c.by_m.contains_key(&4096),
                "{name}"
            );
        }
        assert!(find_tuned(&[], "E=3,N=5,device_name=nothing.json")
            .unwrap()
            .is_none());
    }

    #[test]
    fn file_names_follow_sglang() {
        assert_eq!(
            config_file_name(257, 256, "NVIDIA H100 80GB HBM3", QuantScheme::Fp8Block128),
            "E=257,N=256,device_name=NVIDIA_H100_80GB_HBM3,dtype=fp8_w8a8,block_shape=[128,128].json"
        );
        assert_eq!(
            config_file_name(128, 768, "NVIDIA H200", QuantScheme::Bf16),
            "E=128,N=768,device_name=NVIDIA_H200.json"
        );
    }
}
