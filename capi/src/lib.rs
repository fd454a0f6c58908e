//! The C ABI: an engine written in C, C++ or Python (ctypes) creates a MoE layer from a Hugging
//! Face checkpoint directory, runs it on its buffers, asks which path was chosen, and destroys
//! it. Every entry point returns a [`MoeStatus`] and never unwinds across the boundary; the
//! message of the last error on the calling thread is read with [`moe_last_error`]. The header
//! `include/moe_runner.h` is generated from this file by cbindgen (a test keeps it current).

use moe_dispatch::{make_dispatcher_on, DispatcherConfig, MoeLayer};
use moe_examples::checkpoint_layer::CheckpointLayer;
use moe_examples::plan::{LayerPlan, Parallelism};
use moe_runner_core::{
    quant_to_device, DType, Device, DeviceOps, DispatchFormat, MoeError, MoeRunner, Tensor, TopK,
};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

/// Result of every call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoeStatus {
    Ok = 0,
    /// A null pointer, a size that does not match the layer, an unknown option.
    InvalidArgument = 1,
    /// A missing, truncated or corrupt checkpoint, an unknown architecture, a missing tensor.
    Checkpoint = 2,
    /// No registered runner for the checkpoint's scheme on the device.
    NoPath = 3,
    /// No GPU or driver, out of device memory, a failed kernel.
    Device = 4,
    /// Anything else (a panic caught at the boundary included).
    Internal = 5,
}

/// Options of [`moe_layer_create`]; zero-initialized means the defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MoeOptions {
    /// CUDA device ordinal + 1; 0 runs on the CPU.
    pub cuda_device_plus_one: i32,
    /// The checkpoint's decoder layer + 1; 0 takes the first layer with routed experts.
    pub layer_plus_one: i32,
    /// Most tokens one forward call passes (0: 4096).
    pub max_tokens: i64,
    /// A registered runner's name, or null / "auto" for the preferred path on the device.
    pub runner: *const c_char,
    /// The engine's `CUstream` (e.g. PyTorch's `torch.cuda.current_stream().cuda_stream`) in
    /// the device's primary context: the layer queues its work there and `moe_layer_forward`
    /// returns without waiting. Null: the layer's own stream, and forward returns when `out`
    /// is written.
    pub cuda_stream: *mut c_void,
}

/// What a created layer expects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MoeLayerInfo {
    pub hidden_size: i64,
    pub num_experts: i64,
    pub top_k: i64,
    /// Element type of `hidden` and `out`: 0 f32, 1 bf16, 2 f16.
    pub activation_dtype: i32,
    /// 1 when `hidden` and `out` are CUDA device pointers, 0 for host pointers.
    pub on_gpu: i32,
}

/// An opaque layer.
pub struct MoeLayerHandle {
    layer: MoeLayer,
    device: Device,
    info: MoeLayerInfo,
    max_tokens: usize,
    /// Work goes on the engine's stream: forward does not wait for it.
    engine_stream: bool,
    act: DType,
    path: std::ffi::CString,
}

impl MoeLayerHandle {
    /// `tokens` as a row count, within what the layer was created for.
    fn tokens(&self, tokens: i64) -> Result<usize, (MoeStatus, String)> {
        if tokens < 0 || tokens as usize > self.max_tokens {
            return Err((
                MoeStatus::InvalidArgument,
                format!(
                    "tokens = {tokens}; the layer was created for 0..={}",
                    self.max_tokens
                ),
            ));
        }
        Ok(tokens as usize)
    }
}

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn fail(status: MoeStatus, msg: impl Into<String>) -> MoeStatus {
    LAST_ERROR.with(|e| *e.borrow_mut() = msg.into());
    status
}

fn status_of(e: &MoeError) -> MoeStatus {
    match e {
        MoeError::Checkpoint { .. } => MoeStatus::Checkpoint,
        MoeError::Unknown { kind, .. } if kind.contains("architecture") => MoeStatus::Checkpoint,
        MoeError::Unknown { kind, .. } if kind.contains("runner") => MoeStatus::NoPath,
        MoeError::NoPath { .. } | MoeError::UnsupportedScheme { .. } => MoeStatus::NoPath,
        MoeError::Device(_) | MoeError::NoCuda(_) | MoeError::Kernel { .. } => MoeStatus::Device,
        _ => MoeStatus::InvalidArgument,
    }
}

/// Runs `f`, turning errors and panics into a status and the thread's last error.
fn guard(f: impl FnOnce() -> Result<(), (MoeStatus, String)>) -> MoeStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            LAST_ERROR.with(|e| e.borrow_mut().clear());
            MoeStatus::Ok
        }
        Ok(Err((s, msg))) => fail(s, msg),
        Err(_) => fail(MoeStatus::Internal, "panic inside the MoE runner"),
    }
}

fn moe(e: MoeError) -> (MoeStatus, String) {
    (status_of(&e), e.to_string())
}

fn cli(e: moe_examples::CliError) -> (MoeStatus, String) {
    match e {
        moe_examples::CliError::Moe(m) => moe(m),
        other => (MoeStatus::Checkpoint, other.to_string()),
    }
}

fn null(what: &str) -> (MoeStatus, String) {
    (MoeStatus::InvalidArgument, format!("{what} is null"))
}

fn text<'a>(p: *const c_char, what: &str) -> Result<&'a str, (MoeStatus, String)> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: the caller passes a NUL-terminated string (checked non-null above).
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| (MoeStatus::InvalidArgument, format!("{what} is not UTF-8")))
}

fn create(
    dir: *const c_char,
    options: *const MoeOptions,
) -> Result<MoeLayerHandle, (MoeStatus, String)> {
    moe_examples::link_backends();
    let dir = text(dir, "checkpoint_dir")?;
    let opts = if options.is_null() {
        MoeOptions::default()
    } else {
        // SAFETY: non-null, and the caller passes a valid MoeOptions.
        unsafe { *options }
    };
    let device = match (opts.cuda_device_plus_one, opts.cuda_stream.is_null()) {
        (0, true) => Device::cpu(),
        (0, false) => {
            return Err((
                MoeStatus::InvalidArgument,
                "cuda_stream given for a CPU layer".into(),
            ))
        }
        (n, true) if n > 0 => Device::cuda(n as usize - 1).map_err(moe)?,
        // SAFETY: the caller passes a live stream of that device's primary context.
        (n, false) if n > 0 => Device::Cuda(
            unsafe {
                moe_runner_core::CudaDevice::with_stream(n as usize - 1, opts.cuda_stream.cast())
            }
            .map_err(moe)?,
        ),
        (n, _) => {
            return Err((
                MoeStatus::InvalidArgument,
                format!("cuda_device_plus_one = {n}"),
            ))
        }
    };
    let layer = match opts.layer_plus_one {
        0 => None,
        n if n > 0 => Some(n as usize - 1),
        n => return Err((MoeStatus::InvalidArgument, format!("layer_plus_one = {n}"))),
    };
    let max_tokens = match opts.max_tokens {
        0 => 4096,
        n if n > 0 => n as usize,
        n => return Err((MoeStatus::InvalidArgument, format!("max_tokens = {n}"))),
    };
    let runner_name = if opts.runner.is_null() {
        "auto"
    } else {
        text(opts.runner, "runner")?
    };
    let ck = CheckpointLayer::open(Path::new(dir), layer).map_err(cli)?;
    let mut plan = LayerPlan::new(
        &ck.spec,
        Parallelism {
            tp: 1,
            ep: 1,
            fuse_shared: false,
        },
        0,
    )
    .map_err(cli)?;
    ck.router(&mut plan).map_err(cli)?;
    let cfg = plan.config.clone();
    let runner = if runner_name == "auto" {
        MoeRunner::auto(&device, DispatchFormat::Standard, ck.scheme, cfg.clone())
    } else {
        MoeRunner::on_device(
            &device,
            runner_name,
            DispatchFormat::Standard,
            ck.scheme,
            cfg.clone(),
        )
    }
    .map_err(moe)?;
    let weights = ck.experts(&plan, 1, &|_| {}).map_err(cli)?;
    let weights = if device.is_cuda() {
        quant_to_device(weights.as_ref(), &device).map_err(moe)?
    } else {
        weights
    };
    let shared = ck.shared(&plan).map_err(cli)?;
    let dcfg = DispatcherConfig::single(cfg.num_experts, cfg.hidden_size, max_tokens)
        .with_top_k(cfg.top_k);
    let dispatcher = make_dispatcher_on("standard", &dcfg, &device).map_err(moe)?;
    let act = match ck.scheme {
        moe_runner_core::QuantScheme::F32 => DType::F32,
        moe_runner_core::QuantScheme::F16 => DType::F16,
        _ => DType::Bf16,
    };
    let path = std::ffi::CString::new(runner.describe()).unwrap_or_default();
    let info = MoeLayerInfo {
        hidden_size: cfg.hidden_size as i64,
        num_experts: cfg.num_experts as i64,
        top_k: ck.spec.top_k as i64,
        activation_dtype: match act {
            DType::F32 => 0,
            DType::F16 => 2,
            _ => 1,
        },
        on_gpu: i32::from(device.is_cuda()),
    };
    let layer = MoeLayer::new(plan.router, dispatcher, runner, weights, shared).map_err(moe)?;
    Ok(MoeLayerHandle {
        layer,
        device,
        info,
        max_tokens,
        engine_stream: !opts.cuda_stream.is_null(),
        act,
        path,
    })
}

/// Creates a layer from the checkpoint in `checkpoint_dir` (config.json and safetensors) with
/// `options` (null for the defaults); `*out` receives it.
///
/// # Safety
/// `checkpoint_dir` is a NUL-terminated string; `options` is null or valid; `out` is valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn moe_layer_create(
    checkpoint_dir: *const c_char,
    options: *const MoeOptions,
    out: *mut *mut MoeLayerHandle,
) -> MoeStatus {
    guard(|| {
        if out.is_null() {
            return Err(null("out"));
        }
        let h = create(checkpoint_dir, options)?;
        // SAFETY: `out` is non-null and valid for a write (the caller's contract).
        unsafe { *out = Box::into_raw(Box::new(h)) };
        Ok(())
    })
}

/// Writes what `layer` expects into `*info`.
///
/// # Safety
/// `layer` comes from [`moe_layer_create`]; `info` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn moe_layer_info(
    layer: *const MoeLayerHandle,
    info: *mut MoeLayerInfo,
) -> MoeStatus {
    guard(|| {
        // SAFETY: null-checked; otherwise the caller's contract.
        let (Some(l), false) = (unsafe { layer.as_ref() }, info.is_null()) else {
            return Err(null("layer or info"));
        };
        // SAFETY: non-null and valid for a write.
        unsafe { *info = l.info };
        Ok(())
    })
}

/// The chosen path, e.g. `(standard, triton) fp8-block-128x128 via fused on NVIDIA H100`, as a
/// NUL-terminated string owned by the layer (valid until it is destroyed); null for a null layer.
///
/// # Safety
/// `layer` is null or comes from [`moe_layer_create`].
#[no_mangle]
pub unsafe extern "C" fn moe_layer_path(layer: *const MoeLayerHandle) -> *const c_char {
    // SAFETY: null or the caller's live layer.
    match unsafe { layer.as_ref() } {
        Some(l) => l.path.as_ptr(),
        None => std::ptr::null(),
    }
}

/// Runs the layer on `tokens` rows: `hidden [tokens, H]` and `out [tokens, H]` in the
/// activation dtype, on the GPU when the layer is (device pointers) or the host;
/// `router_logits [tokens, E]` f32 on the host. Returns when `out` is written, or, for a layer
/// on the engine's stream, once the work is queued there.
///
/// # Safety
/// The pointers address buffers of those sizes that stay valid during the call; `out` may not
/// overlap `hidden`.
#[no_mangle]
pub unsafe extern "C" fn moe_layer_forward(
    layer: *mut MoeLayerHandle,
    hidden: *const c_void,
    router_logits: *const f32,
    out: *mut c_void,
    tokens: i64,
) -> MoeStatus {
    guard(|| {
        // SAFETY: null or the caller's live layer.
        let l = unsafe { layer.as_ref() }.ok_or_else(|| null("layer"))?;
        if hidden.is_null() || router_logits.is_null() || out.is_null() {
            return Err(null("hidden, router_logits or out"));
        }
        let m = l.tokens(tokens)?;
        let (h, e) = (l.info.hidden_size as usize, l.info.num_experts as usize);
        // SAFETY: the caller's contract: [m, E] f32 on the host.
        let logits =
            unsafe { Tensor::borrow_host(router_logits as *mut u8, &[m, e], DType::F32, false) }
                .map_err(moe)?;
        let input = match &l.device {
            // SAFETY: the caller's contract: [m, H] activations on the device / the host.
            Device::Cuda(dev) => unsafe { Tensor::borrow_cuda(dev, hidden as u64, &[m, h], l.act) },
            Device::Cpu(_) => unsafe {
                Tensor::borrow_host(hidden as *mut u8, &[m, h], l.act, false)
            },
        }
        .map_err(moe)?;
        let y = l.layer.forward(&input, &logits).map_err(moe)?;
        let bytes = m * h * l.act.size();
        match &l.device {
            Device::Cuda(dev) => {
                let src = y.cuda_ptr().map_err(moe)?;
                // SAFETY: both hold `bytes` bytes on this device; ordered on its stream.
                unsafe {
                    moe_runner_core::cuda::cudarc::driver::result::memcpy_dtod_async(
                        out as u64,
                        src,
                        bytes,
                        dev.stream().cu_stream(),
                    )
                }
                .map_err(|e| moe(MoeError::Device(e.to_string())))?;
            }
            Device::Cpu(_) => {
                let host = y.to_host().map_err(moe)?;
                let b = host.host_bytes().map_err(moe)?;
                // SAFETY: `out` holds `bytes` writable bytes (the caller's contract).
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), out as *mut u8, bytes) };
            }
        }
        if l.engine_stream {
            return Ok(());
        }
        l.device.synchronize().map_err(moe)
    })
}

/// The engine's path: routed experts only, on routing the engine computed. `hidden [tokens, H]`
/// and `out [tokens, H]` in the activation dtype, `topk_ids [tokens, k]` i32 and
/// `topk_weights [tokens, k]` f32, all on the layer's device (device pointers for a GPU
/// layer). Shared experts are not added: the engine runs them as its own MLP. On a GPU this
/// allocates nothing once warm and waits for nothing on the host, so an engine can capture it
/// in a CUDA graph on its stream.
///
/// # Safety
/// The pointers address buffers of those sizes that stay valid until the work completes;
/// `out` may not overlap the inputs.
#[no_mangle]
pub unsafe extern "C" fn moe_layer_forward_routed(
    layer: *mut MoeLayerHandle,
    hidden: *const c_void,
    topk_ids: *const i32,
    topk_weights: *const f32,
    out: *mut c_void,
    tokens: i64,
) -> MoeStatus {
    guard(|| {
        // SAFETY: null or the caller's live layer.
        let l = unsafe { layer.as_ref() }.ok_or_else(|| null("layer"))?;
        if hidden.is_null() || topk_ids.is_null() || topk_weights.is_null() || out.is_null() {
            return Err(null("hidden, topk_ids, topk_weights or out"));
        }
        let m = l.tokens(tokens)?;
        let (h, k) = (l.info.hidden_size as usize, l.info.top_k as usize);
        // SAFETY (each borrow): the caller's contract on the pointers and their sizes.
        let borrow = |p: *const c_void, shape: &[usize], dtype: DType| match &l.device {
            Device::Cuda(dev) => unsafe { Tensor::borrow_cuda(dev, p as u64, shape, dtype) },
            Device::Cpu(_) => unsafe { Tensor::borrow_host(p as *mut u8, shape, dtype, false) },
        };
        let input = borrow(hidden, &[m, h], l.act).map_err(moe)?;
        let topk = TopK::new(
            borrow(topk_ids.cast(), &[m, k], DType::I32).map_err(moe)?,
            borrow(topk_weights.cast(), &[m, k], DType::F32).map_err(moe)?,
        )
        .map_err(moe)?;
        match &l.device {
            Device::Cuda(dev) => {
                // SAFETY: the caller's contract: [m, H] activations on the device.
                let y =
                    unsafe { Tensor::borrow_cuda(dev, out as u64, &[m, h], l.act) }.map_err(moe)?;
                l.layer.forward_routed_into(&input, topk, &y).map_err(moe)?;
            }
            Device::Cpu(_) => {
                let y = l.layer.forward_routed(&input, topk).map_err(moe)?;
                let b = y.host_bytes().map_err(moe)?;
                if b.len() != m * h * l.act.size() {
                    return Err((
                        MoeStatus::Internal,
                        format!(
                            "the routed output has {} bytes, not [{m}, {h}] {}",
                            b.len(),
                            l.act
                        ),
                    ));
                }
                // SAFETY: `out` holds m * H activations (the caller's contract), checked above.
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), out as *mut u8, b.len()) };
            }
        }
        if l.engine_stream {
            return Ok(());
        }
        l.device.synchronize().map_err(moe)
    })
}

/// Frees a layer (null is ignored).
///
/// # Safety
/// `layer` is null or comes from [`moe_layer_create`] and is not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn moe_layer_destroy(layer: *mut MoeLayerHandle) {
    if !layer.is_null() {
        // SAFETY: created by `Box::into_raw` in `moe_layer_create`, destroyed once.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(layer) })));
    }
}

/// Copies the calling thread's last error message into `buf` (NUL-terminated, truncated to
/// `len`); returns the message's full length.
///
/// # Safety
/// `buf` is null or valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn moe_last_error(buf: *mut c_char, len: usize) -> usize {
    LAST_ERROR.with(|e| {
        let e = e.borrow();
        if !buf.is_null() && len > 0 {
            let n = e.len().min(len - 1);
            // SAFETY: `buf` holds `len` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(e.as_ptr(), buf as *mut u8, n);
                *buf.add(n) = 0;
            }
        }
        e.len()
    })
}
