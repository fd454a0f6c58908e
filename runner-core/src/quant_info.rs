//! Quant info: the expert weights of one layer in one [`QuantScheme`], with the scales the
//! scheme needs. Every type here can dequantize one expert to f32, which is what the CPU
//! reference computes with and what tests compare kernels against.

use crate::{
    DType, Device, MoeError, MoeRunnerConfig, Mxfp4Acts, Nvfp4Products, QuantScheme, Result, Tensor,
};
use std::any::Any;

pub trait QuantInfo: Any + Send + Sync {
    fn scheme(&self) -> QuantScheme;
}

/// Downcasts quant info to the concrete type a runner reads.
pub fn downcast_quant<T: QuantInfo>(quant: &dyn QuantInfo) -> Result<&T> {
    (quant as &dyn Any)
        .downcast_ref::<T>()
        .ok_or_else(|| MoeError::QuantMismatch {
            expected: std::any::type_name::<T>().to_string(),
            got: quant.scheme().to_string(),
        })
}

/// `QuantInfo` for a weight type of one scheme.
macro_rules! quant_info {
    ($ty:ty, $scheme:expr) => {
        impl QuantInfo for $ty {
            fn scheme(&self) -> QuantScheme {
                $scheme
            }
        }
    };
}

/// The (weights, scales) of one projection, for weight types with fields `w13`, `w13_scale`,
/// `w2`, `w2_scale`; with `new`, also `to_device` through the type's four-tensor constructor.
macro_rules! scaled_projections {
    ($ty:ident) => {
        impl $ty {
            fn tensors(&self, proj: Proj) -> (&Tensor, &Tensor) {
                match proj {
                    Proj::W13 => (&self.w13, &self.w13_scale),
                    Proj::W2 => (&self.w2, &self.w2_scale),
                }
            }
        }
    };
    ($ty:ident, new) => {
        scaled_projections!($ty);
        impl $ty {
            /// A copy with every tensor on `device` (weights are uploaded once, at load).
            pub fn to_device(&self, device: &Device) -> Result<Self> {
                Self::new(
                    self.w13.to_device(device)?,
                    self.w13_scale.to_device(device)?,
                    self.w2.to_device(device)?,
                    self.w2_scale.to_device(device)?,
                )
            }
        }
    };
}

/// The two expert projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proj {
    /// `w13 [E, N1, H]`, N1 = 2I gated (gate and up) or I.
    W13,
    /// `w2 [E, H, I]`.
    W2,
}

/// Sizes shared by every weight set: experts, GEMM 1 columns, hidden, intermediate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightDims {
    pub experts: usize,
    pub n1: usize,
    pub hidden: usize,
    pub inter: usize,
}

impl WeightDims {
    /// The sizes a runner of `cfg` expects: its local experts, gated GEMM 1 width, H and I.
    pub fn of(cfg: &MoeRunnerConfig) -> Self {
        Self {
            experts: cfg.num_local_experts,
            n1: cfg.gemm1_columns(),
            hidden: cfg.hidden_size,
            inter: cfg.intermediate_size,
        }
    }

    /// (rows, cols) of one expert's matrix.
    pub fn matrix(&self, proj: Proj) -> (usize, usize) {
        match proj {
            Proj::W13 => (self.n1, self.hidden),
            Proj::W2 => (self.hidden, self.inter),
        }
    }

    /// Checks these sizes against a runner config (local experts, gated width, H, I).
    pub fn check(&self, cfg: &MoeRunnerConfig) -> Result<()> {
        let want = Self::of(cfg);
        if *self != want {
            let list = |d: &Self| vec![d.experts, d.n1, d.hidden, d.inter];
            return Err(MoeError::Shape {
                what: "weights [local experts, GEMM 1 columns, hidden, intermediate]".into(),
                expected: list(&want),
                got: list(self),
            });
        }
        Ok(())
    }
}

/// Weight sets that can be dequantized one expert at a time.
pub trait ExpertWeights: QuantInfo {
    fn dims(&self) -> WeightDims;
    /// Writes expert `e`'s `proj` matrix, row-major, as f32 into `out`.
    fn dequantize_expert(&self, proj: Proj, e: usize, out: &mut [f32]) -> Result<()>;
}

/// Views quant info as a dequantizable weight set, for every scheme this crate defines.
pub fn as_expert_weights(quant: &dyn QuantInfo) -> Result<&dyn ExpertWeights> {
    Ok(match quant.scheme() {
        QuantScheme::F32 | QuantScheme::Bf16 | QuantScheme::F16 => {
            downcast_quant::<DenseWeights>(quant)?
        }
        QuantScheme::Fp8Block128 => downcast_quant::<Fp8BlockWeights>(quant)?,
        QuantScheme::Fp8PerTensor => downcast_quant::<Fp8PerTensorWeights>(quant)?,
        QuantScheme::Fp8PerChannel => downcast_quant::<Fp8PerChannelWeights>(quant)?,
        QuantScheme::Nvfp4 => downcast_quant::<Nvfp4Weights>(quant)?,
        QuantScheme::Mxfp4 | QuantScheme::Mxfp4A4 | QuantScheme::Mxfp4A8 => {
            downcast_quant::<Mxfp4Weights>(quant)?
        }
    })
}

/// A copy of any weight set of this crate with its tensors on `device`.
pub fn quant_to_device(quant: &dyn QuantInfo, device: &Device) -> Result<Box<dyn QuantInfo>> {
    Ok(match quant.scheme() {
        QuantScheme::F32 | QuantScheme::Bf16 | QuantScheme::F16 => {
            Box::new(downcast_quant::<DenseWeights>(quant)?.to_device(device)?)
        }
        QuantScheme::Fp8Block128 => {
            Box::new(downcast_quant::<Fp8BlockWeights>(quant)?.to_device(device)?)
        }
        QuantScheme::Fp8PerTensor => {
            Box::new(downcast_quant::<Fp8PerTensorWeights>(quant)?.to_device(device)?)
        }
        QuantScheme::Fp8PerChannel => {
            Box::new(downcast_quant::<Fp8PerChannelWeights>(quant)?.to_device(device)?)
        }
        QuantScheme::Nvfp4 => Box::new(downcast_quant::<Nvfp4Weights>(quant)?.to_device(device)?),
        QuantScheme::Mxfp4 | QuantScheme::Mxfp4A4 | QuantScheme::Mxfp4A8 => {
            Box::new(downcast_quant::<Mxfp4Weights>(quant)?.to_device(device)?)
        }
    })
}

fn expert_slice<T: crate::Element>(t: &Tensor, e: usize, per: usize) -> Result<&[T]> {
    let all = t.as_slice::<T>()?;
    all.get(e * per..(e + 1) * per)
        .ok_or_else(|| MoeError::invalid("expert index", format!("{e} out of range")))
}

fn check_out(out: &[f32], rows: usize, cols: usize) -> Result<()> {
    if out.len() != rows * cols {
        return Err(MoeError::shape(
            "dequantized expert",
            &[rows, cols],
            &[out.len()],
        ));
    }
    Ok(())
}

fn dims3(t: &Tensor, what: &str) -> Result<[usize; 3]> {
    t.dims::<3>(what)
}

/// Checks `w13 [E, N1, H*]` and `w2 [E, H, I*]` agree, where `pack` is the number of values per
/// stored element along the last axis; returns the logical sizes.
fn weight_dims(w13: &Tensor, w2: &Tensor, pack: usize) -> Result<WeightDims> {
    let [e, n1, h_packed] = dims3(w13, "w13")?;
    let [e2, h, i_packed] = dims3(w2, "w2")?;
    let dims = WeightDims {
        experts: e,
        n1,
        hidden: h_packed * pack,
        inter: i_packed * pack,
    };
    if e2 != e || h != dims.hidden {
        return Err(MoeError::shape(
            "w2",
            &[e, dims.hidden, i_packed],
            w2.shape(),
        ));
    }
    if n1 != dims.inter && n1 != 2 * dims.inter {
        return Err(MoeError::Invalid {
            what: "w13".into(),
            msg: format!("GEMM 1 width {n1} is neither I = {} nor 2I", dims.inter),
        });
    }
    Ok(dims)
}

// ---------------------------------------------------------------- dense

/// Unquantized experts (f32, bf16 or f16; both projections the same dtype).
#[derive(Debug)]
pub struct DenseWeights {
    pub w13: Tensor,
    pub w2: Tensor,
    dims: WeightDims,
}

impl DenseWeights {
    pub fn new(w13: Tensor, w2: Tensor) -> Result<Self> {
        w13.expect_dtype("w13", &[DType::F32, DType::Bf16, DType::F16])?;
        w2.expect_dtype("w2", &[w13.dtype()])?;
        let dims = weight_dims(&w13, &w2, 1)?;
        Ok(Self { w13, w2, dims })
    }

    /// f32 weights from row-major values `[E, N1, H]` and `[E, H, I]`, stored as `dtype`.
    pub fn from_f32(w13: &[f32], w2: &[f32], dims: WeightDims, dtype: DType) -> Result<Self> {
        Self::new(
            Tensor::from_f32(w13, &[dims.experts, dims.n1, dims.hidden], dtype)?,
            Tensor::from_f32(w2, &[dims.experts, dims.hidden, dims.inter], dtype)?,
        )
    }

    fn tensor(&self, proj: Proj) -> &Tensor {
        match proj {
            Proj::W13 => &self.w13,
            Proj::W2 => &self.w2,
        }
    }
}

impl DenseWeights {
    /// A copy with every tensor on `device` (weights are uploaded once, at load).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Self::new(self.w13.to_device(device)?, self.w2.to_device(device)?)
    }
}

impl QuantInfo for DenseWeights {
    fn scheme(&self) -> QuantScheme {
        match self.w13.dtype() {
            DType::Bf16 => QuantScheme::Bf16,
            DType::F16 => QuantScheme::F16,
            _ => QuantScheme::F32,
        }
    }
}

impl ExpertWeights for DenseWeights {
    fn dims(&self) -> WeightDims {
        self.dims
    }
    fn dequantize_expert(&self, proj: Proj, e: usize, out: &mut [f32]) -> Result<()> {
        let (r, c) = self.dims.matrix(proj);
        check_out(out, r, c)?;
        let t = self.tensor(proj);
        match t.dtype() {
            DType::F32 => out.copy_from_slice(expert_slice::<f32>(t, e, r * c)?),
            DType::Bf16 => {
                for (o, v) in out.iter_mut().zip(expert_slice::<half::bf16>(t, e, r * c)?) {
                    *o = v.to_f32();
                }
            }
            _ => {
                for (o, v) in out.iter_mut().zip(expert_slice::<half::f16>(t, e, r * c)?) {
                    *o = v.to_f32();
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- FP8 128x128 blocks

/// Block size of [`Fp8BlockWeights`] (DeepSeek-V3).
pub const FP8_BLOCK: (usize, usize) = (128, 128);

/// FP8 E4M3 experts with one f32 scale per 128x128 block:
/// `w13_scale [E, ceil(N1/128), ceil(H/128)]`, `w2_scale [E, ceil(H/128), ceil(I/128)]`.
#[derive(Debug)]
pub struct Fp8BlockWeights {
    pub w13: Tensor,
    pub w13_scale: Tensor,
    pub w2: Tensor,
    pub w2_scale: Tensor,
    dims: WeightDims,
}

fn block_scale_shape(e: usize, rows: usize, cols: usize) -> [usize; 3] {
    [e, rows.div_ceil(FP8_BLOCK.0), cols.div_ceil(FP8_BLOCK.1)]
}

impl Fp8BlockWeights {
    pub fn new(w13: Tensor, w13_scale: Tensor, w2: Tensor, w2_scale: Tensor) -> Result<Self> {
        w13.expect_dtype("w13", &[DType::F8E4M3])?;
        w2.expect_dtype("w2", &[DType::F8E4M3])?;
        w13_scale.expect_dtype("w13_scale", &[DType::F32])?;
        w2_scale.expect_dtype("w2_scale", &[DType::F32])?;
        let d = weight_dims(&w13, &w2, 1)?;
        w13_scale.expect_shape("w13_scale", &block_scale_shape(d.experts, d.n1, d.hidden))?;
        w2_scale.expect_shape("w2_scale", &block_scale_shape(d.experts, d.hidden, d.inter))?;
        Ok(Self {
            w13,
            w13_scale,
            w2,
            w2_scale,
            dims: d,
        })
    }

    /// Quantizes dense weights block by block.
    pub fn quantize(dense: &DenseWeights) -> Result<Self> {
        let d = dense.dims;
        let one = |t: &Tensor, r: usize, c: usize| -> Result<(Tensor, Tensor)> {
            let q = moe_quant::quantize_fp8_blocks(&t.to_f32_vec()?, d.experts, r, c, FP8_BLOCK)?;
            Ok((
                Tensor::from_slice(&q.data, &[d.experts, r, c], DType::F8E4M3)?,
                Tensor::from_slice(&q.scales, &block_scale_shape(d.experts, r, c), DType::F32)?,
            ))
        };
        let (w13, s13) = one(&dense.w13, d.n1, d.hidden)?;
        let (w2, s2) = one(&dense.w2, d.hidden, d.inter)?;
        Self::new(w13, s13, w2, s2)
    }
}

scaled_projections!(Fp8BlockWeights, new);
quant_info!(Fp8BlockWeights, QuantScheme::Fp8Block128);

impl ExpertWeights for Fp8BlockWeights {
    fn dims(&self) -> WeightDims {
        self.dims
    }
    fn dequantize_expert(&self, proj: Proj, e: usize, out: &mut [f32]) -> Result<()> {
        let (r, c) = self.dims.matrix(proj);
        check_out(out, r, c)?;
        let (w, s) = self.tensors(proj);
        let sb = r.div_ceil(FP8_BLOCK.0) * c.div_ceil(FP8_BLOCK.1);
        moe_quant::dequantize_fp8_blocks_into(
            expert_slice::<u8>(w, e, r * c)?,
            expert_slice::<f32>(s, e, sb)?,
            r,
            c,
            FP8_BLOCK,
            out,
        )?;
        Ok(())
    }
}

// ---------------------------------------------------------------- FP8 per tensor / channel

/// FP8 experts with one scale per expert matrix (`[E]`), and optional static activation
/// scales (one per layer input; when absent, activations are quantized with the dynamic amax).
#[derive(Debug)]
pub struct Fp8PerTensorWeights {
    pub w13: Tensor,
    pub w13_scale: Tensor,
    pub w2: Tensor,
    pub w2_scale: Tensor,
    pub a13_scale: Option<f32>,
    pub a2_scale: Option<f32>,
    dims: WeightDims,
}

impl Fp8PerTensorWeights {
    pub fn new(
        w13: Tensor,
        w13_scale: Tensor,
        w2: Tensor,
        w2_scale: Tensor,
        a13_scale: Option<f32>,
        a2_scale: Option<f32>,
    ) -> Result<Self> {
        w13.expect_dtype("w13", &[DType::F8E4M3])?;
        w2.expect_dtype("w2", &[DType::F8E4M3])?;
        let d = weight_dims(&w13, &w2, 1)?;
        for (name, t) in [("w13_scale", &w13_scale), ("w2_scale", &w2_scale)] {
            t.expect_dtype(name, &[DType::F32])?;
            t.expect_shape(name, &[d.experts])?;
        }
        for (name, s) in [("a13_scale", a13_scale), ("a2_scale", a2_scale)] {
            if let Some(s) = s {
                if !(s.is_finite() && s > 0.0) {
                    return Err(MoeError::invalid(
                        name,
                        format!("must be finite and positive, got {s}"),
                    ));
                }
            }
        }
        Ok(Self {
            w13,
            w13_scale,
            w2,
            w2_scale,
            a13_scale,
            a2_scale,
            dims: d,
        })
    }

    /// Quantizes dense weights with one scale per expert matrix; dynamic activation scales.
    pub fn quantize(dense: &DenseWeights) -> Result<Self> {
        let d = dense.dims;
        let one = |t: &Tensor, r: usize, c: usize| -> Result<(Tensor, Tensor)> {
            let v = t.to_f32_vec()?;
            let mut data = Vec::with_capacity(v.len());
            let mut scales = Vec::with_capacity(d.experts);
            for chunk in v.chunks(r * c) {
                let (q, s) = moe_quant::quantize_fp8_per_tensor(chunk);
                data.extend_from_slice(&q);
                scales.push(s);
            }
            Ok((
                Tensor::from_slice(&data, &[d.experts, r, c], DType::F8E4M3)?,
                Tensor::from_slice(&scales, &[d.experts], DType::F32)?,
            ))
        };
        let (w13, s13) = one(&dense.w13, d.n1, d.hidden)?;
        let (w2, s2) = one(&dense.w2, d.hidden, d.inter)?;
        Self::new(w13, s13, w2, s2, None, None)
    }
}

impl Fp8PerTensorWeights {
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Self::new(
            self.w13.to_device(device)?,
            self.w13_scale.to_device(device)?,
            self.w2.to_device(device)?,
            self.w2_scale.to_device(device)?,
            self.a13_scale,
            self.a2_scale,
        )
    }
}

scaled_projections!(Fp8PerTensorWeights);
quant_info!(Fp8PerTensorWeights, QuantScheme::Fp8PerTensor);

impl ExpertWeights for Fp8PerTensorWeights {
    fn dims(&self) -> WeightDims {
        self.dims
    }
    fn dequantize_expert(&self, proj: Proj, e: usize, out: &mut [f32]) -> Result<()> {
        let (r, c) = self.dims.matrix(proj);
        check_out(out, r, c)?;
        let (w, s) = self.tensors(proj);
        let scale = expert_slice::<f32>(s, e, 1)?[0];
        for (o, &b) in out.iter_mut().zip(expert_slice::<u8>(w, e, r * c)?) {
            *o = moe_quant::e4m3_to_f32(b) * scale;
        }
        Ok(())
    }
}

/// FP8 experts with one scale per output channel: `w13_scale [E, N1]`, `w2_scale [E, H]`;
/// activations are quantized per token.
#[derive(Debug)]
pub struct Fp8PerChannelWeights {
    pub w13: Tensor,
    pub w13_scale: Tensor,
    pub w2: Tensor,
    pub w2_scale: Tensor,
    dims: WeightDims,
}

impl Fp8PerChannelWeights {
    pub fn new(w13: Tensor, w13_scale: Tensor, w2: Tensor, w2_scale: Tensor) -> Result<Self> {
        w13.expect_dtype("w13", &[DType::F8E4M3])?;
        w2.expect_dtype("w2", &[DType::F8E4M3])?;
        let d = weight_dims(&w13, &w2, 1)?;
        w13_scale.expect_dtype("w13_scale", &[DType::F32])?;
        w2_scale.expect_dtype("w2_scale", &[DType::F32])?;
        w13_scale.expect_shape("w13_scale", &[d.experts, d.n1])?;
        w2_scale.expect_shape("w2_scale", &[d.experts, d.hidden])?;
        Ok(Self {
            w13,
            w13_scale,
            w2,
            w2_scale,
            dims: d,
        })
    }

    pub fn quantize(dense: &DenseWeights) -> Result<Self> {
        let d = dense.dims;
        let one = |t: &Tensor, r: usize, c: usize| -> Result<(Tensor, Tensor)> {
            let (q, s) = moe_quant::quantize_fp8_per_channel(&t.to_f32_vec()?, d.experts * r, c)?;
            Ok((
                Tensor::from_slice(&q, &[d.experts, r, c], DType::F8E4M3)?,
                Tensor::from_slice(&s, &[d.experts, r], DType::F32)?,
            ))
        };
        let (w13, s13) = one(&dense.w13, d.n1, d.hidden)?;
        let (w2, s2) = one(&dense.w2, d.hidden, d.inter)?;
        Self::new(w13, s13, w2, s2)
    }
}

scaled_projections!(Fp8PerChannelWeights, new);
quant_info!(Fp8PerChannelWeights, QuantScheme::Fp8PerChannel);

impl ExpertWeights for Fp8PerChannelWeights {
    fn dims(&self) -> WeightDims {
        self.dims
    }
    fn dequantize_expert(&self, proj: Proj, e: usize, out: &mut [f32]) -> Result<()> {
        let (r, c) = self.dims.matrix(proj);
        check_out(out, r, c)?;
        let (w, s) = self.tensors(proj);
        let scales = expert_slice::<f32>(s, e, r)?;
        let data = expert_slice::<u8>(w, e, r * c)?;
        for ((orow, drow), &sc) in out.chunks_mut(c).zip(data.chunks(c)).zip(scales) {
            for (o, &b) in orow.iter_mut().zip(drow) {
                *o = moe_quant::e4m3_to_f32(b) * sc;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- NVFP4

/// Layout of FP4 block scales.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleLayout {
    /// Row-major `[rows, cols / block]` (checkpoints).
    Linear,
    /// The 128x4 swizzled layout tensor-core kernels read, rows padded to 128.
    Swizzled128x4,
}

/// NVFP4 experts (w4a4): packed E2M1 `w13 [E, N1, H/2]`, `w2 [E, H, I/2]`; E4M3 block scales per
/// 16 values per expert (linear `[E, rows, cols/16]` or swizzled `[E, swizzled_len]`); one f32
/// global scale per expert for each weight, and the input global scales of each GEMM's
/// activations. GEMM alpha = 1 / (gs_a * gs_w). `products`: how the GEMMs take the values of
/// both operands (exact, the default, or rounded to E4M3 for the FP8 tensor cores; see
/// [`Nvfp4Products`]), set with [`Nvfp4Weights::with_products`]. A clone shares the tensors.
#[derive(Clone, Debug)]
pub struct Nvfp4Weights {
    pub w13: Tensor,
    pub w13_scale: Tensor,
    pub w13_global: Vec<f32>,
    pub w2: Tensor,
    pub w2_scale: Tensor,
    pub w2_global: Vec<f32>,
    pub a13_global: Vec<f32>,
    pub a2_global: Vec<f32>,
    pub scale_layout: ScaleLayout,
    pub products: Nvfp4Products,
    dims: WeightDims,
}

/// Values per NVFP4 block scale.
pub const NVFP4_BLOCK: usize = 16;
/// Values per MXFP4 block scale.
pub const MXFP4_BLOCK: usize = 32;

fn fp4_scale_len(layout: ScaleLayout, rows: usize, cols: usize, block: usize) -> usize {
    match layout {
        ScaleLayout::Linear => rows * (cols / block),
        ScaleLayout::Swizzled128x4 => moe_quant::swizzled_len(rows, cols / block),
    }
}

fn check_globals(name: &str, v: &[f32], experts: usize) -> Result<()> {
    if v.len() != experts {
        return Err(MoeError::shape(name, &[experts], &[v.len()]));
    }
    if let Some(bad) = v.iter().find(|g| !(g.is_finite() && **g > 0.0)) {
        return Err(MoeError::invalid(
            name,
            format!("global scales must be finite and positive, got {bad}"),
        ));
    }
    Ok(())
}

impl Nvfp4Weights {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w13: Tensor,
        w13_scale: Tensor,
        w13_global: Vec<f32>,
        w2: Tensor,
        w2_scale: Tensor,
        w2_global: Vec<f32>,
        a13_global: Vec<f32>,
        a2_global: Vec<f32>,
        scale_layout: ScaleLayout,
    ) -> Result<Self> {
        w13.expect_dtype("w13", &[DType::E2M1x2])?;
        w2.expect_dtype("w2", &[DType::E2M1x2])?;
        let d = weight_dims(&w13, &w2, 2)?;
        for (name, v) in [("hidden_size", d.hidden), ("intermediate_size", d.inter)] {
            if v % NVFP4_BLOCK != 0 {
                return Err(MoeError::NotDivisible {
                    what: name.into(),
                    value: v,
                    divisor: NVFP4_BLOCK,
                });
            }
        }
        for (name, t, r, c) in [
            ("w13_scale", &w13_scale, d.n1, d.hidden),
            ("w2_scale", &w2_scale, d.hidden, d.inter),
        ] {
            t.expect_dtype(name, &[DType::F8E4M3])?;
            t.expect_shape(
                name,
                &[d.experts, fp4_scale_len(scale_layout, r, c, NVFP4_BLOCK)],
            )?;
        }
        for (name, v) in [
            ("w13_global", &w13_global),
            ("w2_global", &w2_global),
            ("a13_global", &a13_global),
            ("a2_global", &a2_global),
        ] {
            check_globals(name, v, d.experts)?;
        }
        Ok(Self {
            w13,
            w13_scale,
            w13_global,
            w2,
            w2_scale,
            w2_global,
            a13_global,
            a2_global,
            scale_layout,
            products: Nvfp4Products::Exact,
            dims: d,
        })
    }

    /// The same weights, their products taken as `products`.
    pub fn with_products(mut self, products: Nvfp4Products) -> Self {
        self.products = products;
        self
    }

    /// Quantizes dense weights (global scale per expert from its amax), with the given input
    /// global scales for the two GEMMs' activations (`448 * 6 / amax` of calibration data).
    pub fn quantize(
        dense: &DenseWeights,
        a13_global: Vec<f32>,
        a2_global: Vec<f32>,
        scale_layout: ScaleLayout,
    ) -> Result<Self> {
        let d = dense.dims;
        let one =
            |t: &Tensor, r: usize, c: usize| -> Result<(Tensor, Tensor, Vec<f32>)> {
                let v = t.to_f32_vec()?;
                let (mut packed, mut scales, mut globals) = (Vec::new(), Vec::new(), Vec::new());
                for chunk in v.chunks(r * c) {
                    let amax = chunk.iter().fold(0f32, |m, x| m.max(x.abs()));
                    let gs = moe_quant::nvfp4_global_scale(amax)?;
                    let q = moe_quant::quantize_nvfp4(chunk, r, c, gs)?;
                    packed.extend_from_slice(&q.packed);
                    match scale_layout {
                        ScaleLayout::Linear => scales.extend_from_slice(&q.scales),
                        ScaleLayout::Swizzled128x4 => scales.extend(
                            moe_quant::swizzle_scales_128x4(&q.scales, r, c / NVFP4_BLOCK)?,
                        ),
                    }
                    globals.push(gs);
                }
                let per = fp4_scale_len(scale_layout, r, c, NVFP4_BLOCK);
                Ok((
                    Tensor::from_slice(&packed, &[d.experts, r, c / 2], DType::E2M1x2)?,
                    Tensor::from_slice(&scales, &[d.experts, per], DType::F8E4M3)?,
                    globals,
                ))
            };
        for (name, v) in [("hidden_size", d.hidden), ("intermediate_size", d.inter)] {
            if v % NVFP4_BLOCK != 0 {
                return Err(MoeError::NotDivisible {
                    what: name.into(),
                    value: v,
                    divisor: NVFP4_BLOCK,
                });
            }
        }
        let (w13, s13, g13) = one(&dense.w13, d.n1, d.hidden)?;
        let (w2, s2, g2) = one(&dense.w2, d.hidden, d.inter)?;
        Self::new(
            w13,
            s13,
            g13,
            w2,
            s2,
            g2,
            a13_global,
            a2_global,
            scale_layout,
        )
    }
}

impl Nvfp4Weights {
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Self::new(
            self.w13.to_device(device)?,
            self.w13_scale.to_device(device)?,
            self.w13_global.clone(),
            self.w2.to_device(device)?,
            self.w2_scale.to_device(device)?,
            self.w2_global.clone(),
            self.a13_global.clone(),
            self.a2_global.clone(),
            self.scale_layout,
        )
        .map(|w| w.with_products(self.products))
    }
}

quant_info!(Nvfp4Weights, QuantScheme::Nvfp4);

impl ExpertWeights for Nvfp4Weights {
    fn dims(&self) -> WeightDims {
        self.dims
    }
    fn dequantize_expert(&self, proj: Proj, e: usize, out: &mut [f32]) -> Result<()> {
        let (r, c) = self.dims.matrix(proj);
        check_out(out, r, c)?;
        let (w, s, g) = match proj {
            Proj::W13 => (&self.w13, &self.w13_scale, &self.w13_global),
            Proj::W2 => (&self.w2, &self.w2_scale, &self.w2_global),
        };
        let per = fp4_scale_len(self.scale_layout, r, c, NVFP4_BLOCK);
        let scales = expert_slice::<u8>(s, e, per)?;
        let linear;
        let scales = match self.scale_layout {
            ScaleLayout::Linear => scales,
            ScaleLayout::Swizzled128x4 => {
                linear = moe_quant::unswizzle_scales_128x4(scales, r, c / NVFP4_BLOCK)?;
                &linear
            }
        };
        moe_quant::dequantize_nvfp4_products_into(
            expert_slice::<u8>(w, e, r * c / 2)?,
            scales,
            r,
            c,
            g[e],
            self.products,
            out,
        )?;
        Ok(())
    }
}

// ---------------------------------------------------------------- MXFP4

/// MXFP4 experts: packed E2M1 `w13 [E, N1, H/2]`, `w2 [E, H, I/2]`, UE8M0 scales per 32 values
/// `[E, rows, cols/32]`. `acts` says what the GEMMs read: bf16 (w4a16, the default), or
/// activations quantized per 32 values to E2M1 (w4a4) or E4M3 (w4a8), each with a UE8M0 scale.
#[derive(Debug)]
pub struct Mxfp4Weights {
    pub w13: Tensor,
    pub w13_scale: Tensor,
    pub w2: Tensor,
    pub w2_scale: Tensor,
    pub acts: Mxfp4Acts,
    dims: WeightDims,
}

impl Mxfp4Weights {
    pub fn new(w13: Tensor, w13_scale: Tensor, w2: Tensor, w2_scale: Tensor) -> Result<Self> {
        w13.expect_dtype("w13", &[DType::E2M1x2])?;
        w2.expect_dtype("w2", &[DType::E2M1x2])?;
        let d = weight_dims(&w13, &w2, 2)?;
        for (name, v) in [("hidden_size", d.hidden), ("intermediate_size", d.inter)] {
            if v % MXFP4_BLOCK != 0 {
                return Err(MoeError::NotDivisible {
                    what: name.into(),
                    value: v,
                    divisor: MXFP4_BLOCK,
                });
            }
        }
        w13_scale.expect_dtype("w13_scale", &[DType::Ue8m0])?;
        w2_scale.expect_dtype("w2_scale", &[DType::Ue8m0])?;
        w13_scale.expect_shape("w13_scale", &[d.experts, d.n1, d.hidden / MXFP4_BLOCK])?;
        w2_scale.expect_shape("w2_scale", &[d.experts, d.hidden, d.inter / MXFP4_BLOCK])?;
        Ok(Self {
            w13,
            w13_scale,
            w2,
            w2_scale,
            acts: Mxfp4Acts::Bf16,
            dims: d,
        })
    }

    /// The same weights, read with activations in `acts`.
    pub fn with_acts(mut self, acts: Mxfp4Acts) -> Self {
        self.acts = acts;
        self
    }

    pub fn quantize(dense: &DenseWeights) -> Result<Self> {
        let d = dense.dims;
        for (name, v) in [("hidden_size", d.hidden), ("intermediate_size", d.inter)] {
            if v % MXFP4_BLOCK != 0 {
                return Err(MoeError::NotDivisible {
                    what: name.into(),
                    value: v,
                    divisor: MXFP4_BLOCK,
                });
            }
        }
        let one = |t: &Tensor, r: usize, c: usize| -> Result<(Tensor, Tensor)> {
            let q = moe_quant::quantize_mxfp4(&t.to_f32_vec()?, d.experts * r, c)?;
            Ok((
                Tensor::from_slice(&q.packed, &[d.experts, r, c / 2], DType::E2M1x2)?,
                Tensor::from_slice(&q.scales, &[d.experts, r, c / MXFP4_BLOCK], DType::Ue8m0)?,
            ))
        };
        let (w13, s13) = one(&dense.w13, d.n1, d.hidden)?;
        let (w2, s2) = one(&dense.w2, d.hidden, d.inter)?;
        Self::new(w13, s13, w2, s2)
    }
}

scaled_projections!(Mxfp4Weights);

impl Mxfp4Weights {
    /// A copy with every tensor on `device`, read with the same activations.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self::new(
            self.w13.to_device(device)?,
            self.w13_scale.to_device(device)?,
            self.w2.to_device(device)?,
            self.w2_scale.to_device(device)?,
        )?
        .with_acts(self.acts))
    }
}
impl QuantInfo for Mxfp4Weights {
    fn scheme(&self) -> QuantScheme {
        self.acts.scheme()
    }
}

impl ExpertWeights for Mxfp4Weights {
    fn dims(&self) -> WeightDims {
        self.dims
    }
    fn dequantize_expert(&self, proj: Proj, e: usize, out: &mut [f32]) -> Result<()> {
        let (r, c) = self.dims.matrix(proj);
        check_out(out, r, c)?;
        let (w, s) = self.tensors(proj);
        moe_quant::dequantize_mxfp4_into(
            expert_slice::<u8>(w, e, r * c / 2)?,
            expert_slice::<u8>(s, e, r * c / MXFP4_BLOCK)?,
            r,
            c,
            out,
        )?;
        Ok(())
    }
}
