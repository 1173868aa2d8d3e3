//! [`Step::apply`] for hidden states that are candle CUDA tensors (the `cuda` feature): the
//! layer runs on the device the tensor is on, reading and writing its device memory, with
//! each sequence's conv window kept in device memory between steps
//! ([`DeviceWindows`](crate::windows::DeviceWindows)). Hidden states never go to the host
//! (only when the runtime traces, for the trace).
//!
//! candle and engram-cuda share cudarc 0.19 and the device's primary context. The layer's
//! work is queued on the runtime's compute stream; when that is not candle's stream, the
//! two are ordered by events (the layer waits for candle's work on the tensor, candle's
//! next work waits for the layer), never by a host wait.

use std::sync::Arc;

use candle_core::cuda::cudarc::driver::{CudaSlice, CudaStream, CudaView};
use candle_core::{CudaStorage, DType, Storage, Tensor};
use engram_cuda::{CudaBackendError, DeviceConvState, DeviceSegment, Rows};

use super::Step;
use crate::device::DeviceRows;
use crate::error::{PluginError, Result};
use crate::prefetch::FetchedRows;
use crate::runtime::Padding;
use crate::windows::DeviceWindow;

/// The dtypes the hidden states may have: candle converts them to the kernels' f32 on the
/// device.
const FLOAT_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

impl Step<'_> {
    /// `apply` of a CUDA tensor `[b, t, ...]` (shape already checked) on `device`'s layer.
    pub(super) fn apply_cuda(
        &mut self,
        layer_id: usize,
        hidden: &Tensor,
        device: &Arc<DeviceRows>,
        t: usize,
    ) -> Result<Tensor> {
        let cfg = self.runtime.config().clone();
        let l = cfg.layer_index(layer_id)?;
        let c = cfg.branch_channels();
        let dims = hidden.dims().to_vec();
        let dtype = hidden.dtype();
        if !FLOAT_DTYPES.contains(&dtype) {
            return Err(PluginError::Step(format!(
                "hidden states of Engram layer {layer_id} are {dtype:?} on {:?}; the CUDA \
                 path takes f32, bf16 or f16",
                hidden.device().location()
            )));
        }
        let candle_core::Device::Cuda(cuda_device) = hidden.device() else {
            return Err(PluginError::Step(format!(
                "Engram layer {layer_id}: hidden states are not a CUDA tensor"
            )));
        };
        let backend = device.backend();
        let candle_stream = cuda_device.cuda_stream();
        check_same_device(layer_id, &candle_stream, backend)?;
        let stream = backend.stream().clone();
        let cuda =
            |what: String| move |source: CudaBackendError| PluginError::Cuda { what, source };
        let driver = |what: &str| {
            let what = format!("Engram layer {layer_id}: {what}");
            move |e: engram_cuda::cudarc::driver::DriverError| PluginError::Cuda {
                what,
                source: CudaBackendError::Invalid(format!("{e:?}")),
            }
        };

        let lens = self.rows.lens.clone();
        let tokens: usize = lens.iter().sum();
        let full_len = dims[0] * t * c;
        let starts: Vec<usize> = lens
            .iter()
            .enumerate()
            .map(|(seq, &len)| match self.runtime.options().padding {
                Padding::Right => seq * t,
                Padding::Left => seq * t + t - len,
            })
            .collect();
        let fetched = self.take_rows(l, layer_id)?;
        let FetchedRows::Device(ticket) = fetched else {
            return Err(PluginError::Step(format!(
                "Engram layer {layer_id}: host rows for a layer on the GPU"
            )));
        };

        // f32, contiguous, on candle's stream; then the layer's stream waits for it.
        let h32 = hidden.to_dtype(DType::F32)?.contiguous()?;
        let same_stream = candle_stream.cu_stream() == stream.cu_stream();
        if !same_stream {
            stream
                .join(&candle_stream)
                .map_err(driver("ordering after candle's stream"))?;
        }
        let mut out = backend
            .alloc_zeros::<f32>(tokens * c)
            .map_err(cuda(format!("Engram layer {layer_id}: output buffer")))?;
        let packed = with_device_values(&h32, layer_id, full_len, |all| {
            let mut packed = backend
                .alloc_zeros::<f32>(tokens * c)
                .map_err(cuda(format!(
                    "Engram layer {layer_id}: packed hidden states"
                )))?;
            let mut at = 0;
            for (&s, &len) in starts.iter().zip(&lens) {
                if len == 0 {
                    continue;
                }
                let src = all.slice(s * c..(s + len) * c);
                let mut dst = packed.slice_mut(at * c..(at + len) * c);
                stream
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(driver("packing hidden states"))?;
                at += len;
            }
            Ok(packed)
        })?;

        self.layer_on_device(layer_id, l, device, ticket, &packed, &mut out)?;

        // Back to the host's layout: padding positions keep the input (V4.1) or get a zero
        // delta (paper).
        let mut full: CudaSlice<f32> = if cfg.variant.output_is_delta() {
            backend
                .alloc_zeros::<f32>(full_len)
                .map_err(cuda(format!("Engram layer {layer_id}: output tensor")))?
        } else {
            with_device_values(&h32, layer_id, full_len, |all| {
                stream
                    .clone_dtod(&all)
                    .map_err(driver("copying hidden states"))
            })?
        };
        let mut at = 0;
        for (&s, &len) in starts.iter().zip(&lens) {
            if len == 0 {
                continue;
            }
            let src = out.slice(at * c..(at + len) * c);
            let mut dst = full.slice_mut(s * c..(s + len) * c);
            stream
                .memcpy_dtod(&src, &mut dst)
                .map_err(driver("unpacking the output"))?;
            at += len;
        }
        if let (Some(trace), Some(inputs)) = (self.runtime.trace(), &self.traced) {
            // Tracing checks an integration; it is the one place hidden states go to the host.
            let h = backend.download(&packed).map_err(cuda("trace".into()))?;
            let mut o = backend.download(&out).map_err(cuda("trace".into()))?;
            if cfg.variant.output_is_delta() {
                for (o, &h) in o.iter_mut().zip(&h) {
                    *o = if *o == 0.0 { h } else { h + *o };
                }
            }
            trace.record(layer_id, inputs, &h, &o)?;
        }
        if !same_stream {
            candle_stream
                .join(&stream)
                .map_err(driver("ordering candle's stream after the layer"))?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(full, cuda_device.clone()));
        let result = Tensor::from_storage(
            storage,
            dims.as_slice(),
            candle_core::op::BackpropOp::none(),
            false,
        );
        let result = if cfg.variant.output_is_delta() {
            // A zero delta leaves the value's bits alone, as on the host path.
            let sum = (&h32 + &result)?;
            result.eq(0f64)?.where_cond(&h32, &sum)?
        } else {
            result
        };
        Ok(result.to_dtype(dtype)?)
    }

    /// Runs layer `l` on packed device hidden states, with each sequence's device window.
    fn layer_on_device(
        &mut self,
        layer_id: usize,
        l: usize,
        device: &DeviceRows,
        ticket: engram_cuda::Prefetch,
        packed: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let cfg = self.runtime.config();
        let windows = self.runtime.windows();
        let backend = device.backend();
        let has_conv = cfg.conv_history() > 0;
        let layers = cfg.hash.layer_ids.len();
        let starts: Vec<(u64, usize)> = self
            .states
            .iter()
            .zip(&self.rows.lens)
            .map(|((seq_id, state), &len)| (*seq_id, state.position.saturating_sub(len)))
            .collect();
        if has_conv {
            if let Some(&(seq_id, start)) = starts
                .iter()
                .find(|&&(seq_id, start)| windows.is_lost(seq_id, l, start))
            {
                return Err(PluginError::MissingState {
                    seq_id,
                    position: start,
                    reason: format!(
                        "lost its conv window of Engram layer {layer_id} when that layer \
                         failed on the GPU (restart the sequence at position 0)"
                    ),
                });
            }
        }
        let mut states: Vec<Option<DeviceConvState>> = Vec::with_capacity(self.states.len());
        for ((_, state), &(seq_id, start)) in self.states.iter().zip(&starts) {
            if !has_conv {
                states.push(None);
                continue;
            }
            let window = match windows.take_current(seq_id, l, start) {
                Some(w) => Ok(w),
                None if start == 0 => DeviceConvState::new(backend, cfg),
                // The host window is current (earlier steps ran on the host).
                None => match state.conv.get(l) {
                    Some(host) => DeviceConvState::from_host(backend, host),
                    None => DeviceConvState::new(backend, cfg),
                },
            };
            match window {
                Ok(w) => states.push(Some(w)),
                Err(source) => {
                    // The windows taken so far go back unchanged.
                    for (w, &(id, start)) in states.into_iter().zip(&starts) {
                        if let Some(state) = w {
                            windows.put(
                                id,
                                l,
                                layers,
                                DeviceWindow {
                                    position: start,
                                    state,
                                },
                            );
                        }
                    }
                    return Err(PluginError::Cuda {
                        what: format!("sequence {seq_id}: conv window of Engram layer {layer_id}"),
                        source,
                    });
                }
            }
        }
        let dead = self.rows.dead.as_deref();
        let result = {
            let mut segments: Vec<DeviceSegment<'_>> = states
                .iter_mut()
                .zip(&self.rows.lens)
                .map(|(w, &len)| DeviceSegment {
                    len,
                    conv: w.as_mut(),
                })
                .collect();
            device.with_layer(|layer, store| {
                layer.forward_rows(
                    store,
                    Rows::Prefetched(ticket),
                    packed,
                    dead,
                    &mut segments,
                    out,
                )
            })
        };
        // A failed layer may have written part of the windows: they are lost, not kept.
        for ((seq_id, state), window) in self.states.iter().zip(states) {
            match (window, &result) {
                (Some(window), Ok(())) => windows.put(
                    *seq_id,
                    l,
                    layers,
                    DeviceWindow {
                        position: state.position,
                        state: window,
                    },
                ),
                (Some(_), Err(_)) => windows.mark_lost(*seq_id, l),
                (None, _) => {}
            }
        }
        result.map_err(|source| PluginError::Cuda {
            what: format!("Engram layer {layer_id} on the GPU"),
            source,
        })
    }
}

/// Runs `f` on the first `len` f32 values of a contiguous CUDA tensor's device memory.
fn with_device_values<R>(
    tensor: &Tensor,
    layer_id: usize,
    len: usize,
    f: impl FnOnce(CudaView<'_, f32>) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        return Err(PluginError::Step(format!(
            "Engram layer {layer_id}: hidden states left the GPU"
        )));
    };
    let all = storage.as_cuda_slice::<f32>()?;
    let offset = layout.start_offset();
    if offset + len > all.len() {
        return Err(PluginError::Step(format!(
            "Engram layer {layer_id}: hidden states' storage holds {} values, the layout \
             needs {}",
            all.len(),
            offset + len
        )));
    }
    f(all.slice(offset..offset + len))
}

/// The tensor's device must be the runtime's (same ordinal, same context): anything else is
/// an error naming both, never a copy across devices.
fn check_same_device(
    layer_id: usize,
    candle_stream: &Arc<CudaStream>,
    backend: &engram_cuda::CudaBackend,
) -> Result<()> {
    let tensor_ctx = candle_stream.context();
    let runtime_ctx = backend.context();
    if tensor_ctx.ordinal() != runtime_ctx.ordinal() || tensor_ctx.cu_ctx() != runtime_ctx.cu_ctx()
    {
        return Err(PluginError::Step(format!(
            "hidden states of Engram layer {layer_id} are on CUDA device {}, but the Engram \
             runtime was opened on CUDA device {}{}",
            tensor_ctx.ordinal(),
            runtime_ctx.ordinal(),
            if tensor_ctx.ordinal() == runtime_ctx.ordinal() {
                " in another context"
            } else {
                ""
            }
        )));
    }
    Ok(())
}
