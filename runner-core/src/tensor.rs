//! A minimal contiguous tensor: a shape, a dtype and a buffer that is either owned or borrowed
//! from the engine (host memory, or a device pointer on the engine's stream), so an engine hands
//! its activations and weights to a runner without copies.

use crate::{DType, Device, Element, MoeError, Result};
use half::{bf16, f16};
use std::ptr::NonNull;
use std::sync::Arc;

pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

enum Storage {
    /// Owned host bytes; `u64` words keep every element type aligned. Shared by clones and
    /// copied on the first write to a shared buffer, so passing a tensor along is free.
    Host(Arc<Vec<u64>>),
    /// Host memory the engine owns.
    HostBorrowed { ptr: NonNull<u8>, writable: bool },
    #[cfg(feature = "cuda")]
    Cuda {
        device: crate::CudaDevice,
        buf: CudaBuf,
    },
}

#[cfg(feature = "cuda")]
enum CudaBuf {
    Owned(Arc<cudarc::driver::CudaSlice<u8>>),
    /// Device memory kept alive by `owner`: a region of an owned allocation (a buffer carved
    /// into tensors), or memory a backend allocated itself (peer-mapped all-to-all buffers).
    Held {
        owner: Arc<dyn std::any::Any + Send + Sync>,
        ptr: cudarc::driver::sys::CUdeviceptr,
    },
    /// A device pointer the engine owns, valid on the device's stream.
    Borrowed(cudarc::driver::sys::CUdeviceptr),
}

// SAFETY: owned storage is plain data. Borrowed storage is only created through `unsafe`
// constructors whose contract makes the caller guarantee the memory outlives the tensor and is
// not mutated concurrently through another alias.
unsafe impl Send for Tensor {}
unsafe impl Sync for Tensor {}

impl Clone for Tensor {
    /// Owned buffers are shared (host copy-on-write); a borrowed buffer is shared read-only, so
    /// a clone never gains write access to engine memory.
    fn clone(&self) -> Self {
        let storage = match &self.storage {
            Storage::Host(words) => Storage::Host(words.clone()),
            Storage::HostBorrowed { ptr, .. } => Storage::HostBorrowed {
                ptr: *ptr,
                writable: false,
            },
            #[cfg(feature = "cuda")]
            Storage::Cuda { device, buf } => Storage::Cuda {
                device: device.clone(),
                buf: match buf {
                    CudaBuf::Owned(s) => CudaBuf::Owned(s.clone()),
                    CudaBuf::Held { owner, ptr } => CudaBuf::Held {
                        owner: owner.clone(),
                        ptr: *ptr,
                    },
                    CudaBuf::Borrowed(p) => CudaBuf::Borrowed(*p),
                },
            },
        };
        Self {
            shape: self.shape.clone(),
            dtype: self.dtype,
            storage,
        }
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("shape", &self.shape)
            .field("dtype", &self.dtype)
            .field("device", &self.location())
            .finish()
    }
}

fn check_element<T: Element>(dtype: DType, what: &str) -> Result<()> {
    if T::DTYPES.contains(&dtype) {
        Ok(())
    } else {
        Err(MoeError::DType {
            what: what.to_string(),
            expected: T::DTYPES.to_vec(),
            got: dtype,
        })
    }
}

impl Tensor {
    /// A zero-filled host tensor.
    pub fn zeros(shape: &[usize], dtype: DType) -> Self {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        Self {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Host(Arc::new(vec![0u64; bytes.div_ceil(8)])),
        }
    }

    /// A host tensor holding `data`, which must have `shape`'s element count.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize], dtype: DType) -> Result<Self> {
        check_element::<T>(dtype, "tensor data")?;
        let numel: usize = shape.iter().product();
        if data.len() != numel {
            return Err(MoeError::Invalid {
                what: "tensor data".into(),
                msg: format!("shape {shape:?} needs {numel} elements, got {}", data.len()),
            });
        }
        let mut t = Self::zeros(shape, dtype);
        t.as_mut_slice::<T>()?.copy_from_slice(data);
        Ok(t)
    }

    /// A host tensor of a float dtype (f32, bf16, f16) converted from f32 values.
    pub fn from_f32(data: &[f32], shape: &[usize], dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Self::from_slice(data, shape, dtype),
            DType::Bf16 => {
                let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                Self::from_slice(&v, shape, dtype)
            }
            DType::F16 => {
                let v: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                Self::from_slice(&v, shape, dtype)
            }
            other => Err(MoeError::DType {
                what: "float tensor".into(),
                expected: vec![DType::F32, DType::Bf16, DType::F16],
                got: other,
            }),
        }
    }

    /// Wraps host memory the caller owns, without copying.
    ///
    /// # Safety
    /// `ptr` must point to `numel * dtype.size()` readable bytes, aligned for the dtype's
    /// element type, that stay valid and are not written through another alias while the
    /// tensor lives. With `writable`, the runner may write the memory (in-place output).
    pub unsafe fn borrow_host(
        ptr: *mut u8,
        shape: &[usize],
        dtype: DType,
        writable: bool,
    ) -> Result<Self> {
        let ptr = NonNull::new(ptr).ok_or_else(|| MoeError::invalid("host pointer", "is null"))?;
        if !(ptr.as_ptr() as usize).is_multiple_of(dtype.size()) {
            return Err(MoeError::invalid(
                "host pointer",
                format!("not aligned to {} bytes for {dtype}", dtype.size()),
            ));
        }
        Ok(Self {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::HostBorrowed { ptr, writable },
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// Where the data lives.
    pub fn location(&self) -> &'static str {
        match &self.storage {
            Storage::Host(_) | Storage::HostBorrowed { .. } => "cpu",
            #[cfg(feature = "cuda")]
            Storage::Cuda { .. } => "cuda",
        }
    }

    pub fn is_host(&self) -> bool {
        self.location() == "cpu"
    }

    /// Whether the buffer belongs to someone else (the engine).
    pub fn is_borrowed(&self) -> bool {
        match &self.storage {
            Storage::Host(_) => false,
            Storage::HostBorrowed { .. } => true,
            #[cfg(feature = "cuda")]
            Storage::Cuda { buf, .. } => matches!(buf, CudaBuf::Borrowed(_)),
        }
    }

    /// Checks the dtype against the accepted ones.
    pub fn expect_dtype(&self, what: &str, accepted: &[DType]) -> Result<()> {
        if accepted.contains(&self.dtype) {
            Ok(())
        } else {
            Err(MoeError::DType {
                what: what.to_string(),
                expected: accepted.to_vec(),
                got: self.dtype,
            })
        }
    }

    /// Checks the shape exactly.
    pub fn expect_shape(&self, what: &str, expected: &[usize]) -> Result<()> {
        if self.shape == expected {
            Ok(())
        } else {
            Err(MoeError::shape(what, expected, &self.shape))
        }
    }

    /// The dimensions of a tensor that must have exactly `N` of them.
    pub fn dims<const N: usize>(&self, what: &str) -> Result<[usize; N]> {
        self.shape
            .as_slice()
            .try_into()
            .map_err(|_| MoeError::Invalid {
                what: what.to_string(),
                msg: format!("expected {N} dimensions, got shape {:?}", self.shape),
            })
    }

    /// The raw bytes of a host tensor.
    pub fn host_bytes(&self) -> Result<&[u8]> {
        let len = self.size_in_bytes();
        match &self.storage {
            Storage::Host(words) => Ok(&bytemuck::cast_slice::<u64, u8>(words)[..len]),
            // SAFETY: guaranteed by `borrow_host`'s contract.
            Storage::HostBorrowed { ptr, .. } => unsafe {
                Ok(std::slice::from_raw_parts(ptr.as_ptr(), len))
            },
            #[cfg(feature = "cuda")]
            Storage::Cuda { .. } => Err(MoeError::Device(
                "tensor is on the GPU; copy it to the host first".into(),
            )),
        }
    }

    /// The raw bytes of a host tensor, writable (copies a shared owned buffer first).
    pub fn host_bytes_mut(&mut self) -> Result<&mut [u8]> {
        let len = self.size_in_bytes();
        match &mut self.storage {
            Storage::Host(words) => Ok(&mut bytemuck::cast_slice_mut::<u64, u8>(
                Arc::make_mut(words).as_mut_slice(),
            )[..len]),
            // SAFETY: guaranteed by `borrow_host`'s contract, which granted write access.
            Storage::HostBorrowed {
                ptr,
                writable: true,
            } => unsafe { Ok(std::slice::from_raw_parts_mut(ptr.as_ptr(), len)) },
            Storage::HostBorrowed { .. } => Err(MoeError::invalid(
                "tensor",
                "borrowed read-only; cannot write to it",
            )),
            #[cfg(feature = "cuda")]
            Storage::Cuda { .. } => Err(MoeError::Device(
                "tensor is on the GPU; copy it to the host first".into(),
            )),
        }
    }

    /// The elements of a host tensor.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        check_element::<T>(self.dtype, "tensor view")?;
        bytemuck::try_cast_slice(self.host_bytes()?)
            .map_err(|e| MoeError::invalid("tensor view", e.to_string()))
    }

    /// The elements of a host tensor, writable.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        check_element::<T>(self.dtype, "tensor view")?;
        bytemuck::try_cast_slice_mut(self.host_bytes_mut()?)
            .map_err(|e| MoeError::invalid("tensor view", e.to_string()))
    }

    /// The values of a float host tensor as f32.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        match self.dtype {
            DType::F32 => Ok(self.as_slice::<f32>()?.to_vec()),
            DType::Bf16 => Ok(self
                .as_slice::<bf16>()?
                .iter()
                .map(|x| x.to_f32())
                .collect()),
            DType::F16 => Ok(self.as_slice::<f16>()?.iter().map(|x| x.to_f32()).collect()),
            other => Err(MoeError::DType {
                what: "float tensor".into(),
                expected: vec![DType::F32, DType::Bf16, DType::F16],
                got: other,
            }),
        }
    }

    /// Writes f32 values into a float host tensor, rounding to its dtype.
    pub fn write_f32(&mut self, values: &[f32]) -> Result<()> {
        if values.len() != self.numel() {
            return Err(MoeError::shape(
                "values written",
                &[self.numel()],
                &[values.len()],
            ));
        }
        match self.dtype {
            DType::F32 => self.as_mut_slice::<f32>()?.copy_from_slice(values),
            DType::Bf16 => {
                for (d, &s) in self.as_mut_slice::<bf16>()?.iter_mut().zip(values) {
                    *d = bf16::from_f32(s);
                }
            }
            DType::F16 => {
                for (d, &s) in self.as_mut_slice::<f16>()?.iter_mut().zip(values) {
                    *d = f16::from_f32(s);
                }
            }
            other => {
                return Err(MoeError::DType {
                    what: "float tensor".into(),
                    expected: vec![DType::F32, DType::Bf16, DType::F16],
                    got: other,
                })
            }
        }
        Ok(())
    }

    /// An owned host copy (downloads from the GPU when needed).
    pub fn to_host(&self) -> Result<Tensor> {
        let bytes: Vec<u8> = match &self.storage {
            Storage::Host(_) | Storage::HostBorrowed { .. } => self.host_bytes()?.to_vec(),
            #[cfg(feature = "cuda")]
            Storage::Cuda { device, buf } => cuda_io::download(device, buf, self.size_in_bytes())?,
        };
        let mut t = Tensor::zeros(&self.shape, self.dtype);
        t.host_bytes_mut()?.copy_from_slice(&bytes);
        Ok(t)
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        match device {
            Device::Cpu(_) => self.to_host(),
            #[cfg(feature = "cuda")]
            Device::Cuda(dev) => {
                // Host tensors go up as they are; device ones come down first.
                let moved;
                let bytes = if self.is_host() {
                    self.host_bytes()?
                } else {
                    moved = self.to_host()?;
                    moved.host_bytes()?
                };
                let buf = cuda_io::upload(dev, bytes)?;
                Ok(Tensor {
                    shape: self.shape.clone(),
                    dtype: self.dtype,
                    storage: Storage::Cuda {
                        device: dev.clone(),
                        buf: CudaBuf::Owned(Arc::new(buf)),
                    },
                })
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(MoeError::NoCuda("this build has no `cuda` feature".into())),
        }
    }

    /// Same data, another shape with the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(MoeError::shape("reshape", &self.shape, shape));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }
}

#[cfg(feature = "cuda")]
impl Tensor {
    /// Wraps device memory the engine owns, without copying.
    ///
    /// # Safety
    /// `ptr` must be a device allocation of at least `numel * dtype.size()` bytes in `device`'s
    /// context, valid while the tensor lives, and ordered with the device's stream.
    pub unsafe fn borrow_cuda(
        device: &crate::CudaDevice,
        ptr: cudarc::driver::sys::CUdeviceptr,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Self> {
        if ptr == 0 {
            return Err(MoeError::invalid("device pointer", "is null"));
        }
        Ok(Self {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Cuda {
                device: device.clone(),
                buf: CudaBuf::Borrowed(ptr),
            },
        })
    }
}

#[cfg(feature = "cuda")]
impl Tensor {
    /// A device tensor of `shape`, zero-filled (asynchronously, on the device's stream).
    pub fn zeros_cuda(device: &crate::CudaDevice, shape: &[usize], dtype: DType) -> Result<Self> {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        crate::cuda::record_allocation();
        let buf = device
            .stream()
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| MoeError::Device(format!("allocating {bytes} bytes: {e}")))?;
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Cuda {
                device: device.clone(),
                buf: CudaBuf::Owned(Arc::new(buf)),
            },
        })
    }

    /// The device address of a GPU tensor, for kernel arguments.
    pub fn cuda_ptr(&self) -> Result<cudarc::driver::sys::CUdeviceptr> {
        use cudarc::driver::DevicePtr;
        match &self.storage {
            Storage::Cuda { device, buf } => Ok(match buf {
                CudaBuf::Owned(s) => s.device_ptr(device.stream()).0,
                CudaBuf::Held { ptr, .. } => *ptr,
                CudaBuf::Borrowed(p) => *p,
            }),
            _ => Err(MoeError::Device(
                "tensor is on the host; the GPU runner needs device memory (Tensor::to_device)"
                    .into(),
            )),
        }
    }

    /// A tensor over device memory that `owner` keeps alive (memory a backend allocated
    /// itself, e.g. buffers mapped into peer GPUs).
    ///
    /// # Safety
    /// `ptr` must address at least `numel * dtype.size()` bytes in `device`'s context that stay
    /// valid while `owner` lives.
    pub unsafe fn from_held_cuda(
        device: &crate::CudaDevice,
        owner: Arc<dyn std::any::Any + Send + Sync>,
        ptr: cudarc::driver::sys::CUdeviceptr,
        shape: &[usize],
        dtype: DType,
    ) -> Self {
        Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Cuda {
                device: device.clone(),
                buf: CudaBuf::Held { owner, ptr },
            },
        }
    }

    /// A tensor over `shape` x `dtype` bytes of this device tensor's memory, from byte
    /// `offset`: one allocation carved into several tensors (the all-to-all buffers). The view
    /// keeps an owned allocation alive.
    pub fn cuda_view(&self, offset: usize, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = shape.iter().product::<usize>() * dtype.size();
        let end = offset.checked_add(bytes);
        if end.is_none_or(|e| e > self.size_in_bytes())
            || !offset.is_multiple_of(dtype.size().max(1))
        {
            return Err(MoeError::invalid(
                "tensor view",
                format!(
                    "{bytes} bytes at offset {offset} do not fit aligned in a buffer of {} bytes",
                    self.size_in_bytes()
                ),
            ));
        }
        let base = self.cuda_ptr()?;
        let Storage::Cuda { device, buf } = &self.storage else {
            return Err(MoeError::Device("cuda_view needs a device tensor".into()));
        };
        let ptr = base + offset as u64;
        let buf = match buf {
            CudaBuf::Owned(s) => CudaBuf::Held {
                owner: s.clone(),
                ptr,
            },
            CudaBuf::Held { owner, .. } => CudaBuf::Held {
                owner: owner.clone(),
                ptr,
            },
            CudaBuf::Borrowed(_) => CudaBuf::Borrowed(ptr),
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Cuda {
                device: device.clone(),
                buf,
            },
        })
    }

    /// The GPU this tensor lives on.
    pub fn cuda_device(&self) -> Option<&crate::CudaDevice> {
        match &self.storage {
            Storage::Cuda { device, .. } => Some(device),
            _ => None,
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda_io {
    use super::CudaBuf;
    use crate::{CudaDevice, MoeError, Result};
    use cudarc::driver::CudaSlice;

    fn dev_err(e: cudarc::driver::DriverError) -> MoeError {
        MoeError::Device(e.to_string())
    }

    pub(super) fn upload(dev: &CudaDevice, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        crate::cuda::record_allocation();
        dev.stream().clone_htod(bytes).map_err(dev_err)
    }

    pub(super) fn download(dev: &CudaDevice, buf: &CudaBuf, len: usize) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        match buf {
            CudaBuf::Owned(s) => {
                // Allocations are at least one byte; a view may be shorter than its buffer.
                let mut v = dev.stream().clone_dtoh(s.as_ref()).map_err(dev_err)?;
                v.truncate(len);
                Ok(v)
            }
            CudaBuf::Borrowed(ptr) | CudaBuf::Held { ptr, .. } => {
                let ptr = *ptr;
                let mut out = vec![0u8; len];
                dev.stream().synchronize().map_err(dev_err)?;
                // SAFETY: `borrow_cuda`'s contract (or `view`'s bounds check) makes `ptr`
                // valid for `len` bytes.
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_sync(&mut out, ptr).map_err(dev_err)?;
                }
                Ok(out)
            }
        }
    }
}
