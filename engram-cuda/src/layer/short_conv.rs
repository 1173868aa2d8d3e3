//! The paper variant's depthwise short conv on the device, over every segment of a
//! batch, then the update of the segments' remembered windows.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};

use super::profile::{mark, Marks};
use super::{CudaLayer, DeviceSegment};
use crate::error::Result;
use crate::kernels::{In, Out};

impl CudaLayer {
    /// The short conv over all segments, then the update of their windows.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn short_conv(
        &self,
        stream: &Arc<CudaStream>,
        val: &CudaSlice<f32>,
        z: &CudaSlice<f32>,
        conv_w: &CudaSlice<f32>,
        segments: &mut [DeviceSegment<'_>],
        out: &mut CudaSlice<f32>,
        tokens: usize,
        mut marks: Option<&mut Marks>,
    ) -> Result<()> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let c = cfg.branch_channels();
        let (k, dil, h) = (cfg.kernel_size, cfg.conv_dilation(), cfg.conv_history());
        let s_count = segments.len();
        let mut seg_of = Vec::with_capacity(tokens);
        let mut pos_of = Vec::with_capacity(tokens);
        let mut seg_start = Vec::with_capacity(s_count);
        let mut seg_len = Vec::with_capacity(s_count);
        let mut start = 0usize;
        for (i, s) in segments.iter().enumerate() {
            seg_start.push(start as i32);
            seg_len.push(s.len as i32);
            for p in 0..s.len {
                seg_of.push(i as i32);
                pos_of.push(p as i32);
            }
            start += s.len;
        }
        // Device addresses of the windows (0: a segment that starts its sequence). The
        // guards order later users of the windows after this forward.
        let mut guards = Vec::new();
        let mut hist = Vec::with_capacity(s_count);
        for s in segments.iter_mut() {
            match s.conv.as_deref_mut() {
                Some(st) if h > 0 => {
                    let (p, guard) = st.buf.device_ptr_mut(stream);
                    hist.push(p);
                    guards.push(guard);
                }
                _ => hist.push(0u64),
            }
        }
        let seg_of_d = be.upload(&seg_of)?;
        let pos_of_d = be.upload(&pos_of)?;
        let hist_d = be.upload(&hist)?;
        let (t_i, c_i, k_i, dil_i, h_i, s_i) = (
            tokens as i32,
            c as i32,
            k as i32,
            dil as i32,
            h as i32,
            s_count as i32,
        );
        unsafe {
            be.kernels().short_conv(
                stream,
                self.cfg1d(tokens),
                In::Buf(val),
                In::Buf(z),
                In::Buf(conv_w),
                In::Buf(&seg_of_d),
                In::Buf(&pos_of_d),
                In::Buf(&hist_d),
                Out::Buf(out),
                t_i,
                c_i,
                k_i,
                dil_i,
                h_i,
            )
        }?;
        mark(&mut marks, "conv")?;
        if h > 0 && hist.iter().any(|&p| p != 0) {
            let seg_start_d = be.upload(&seg_start)?;
            let seg_len_d = be.upload(&seg_len)?;
            let mut scratch = be.alloc_zeros::<f32>(s_count * h * c)?;
            unsafe {
                be.kernels().conv_window(
                    stream,
                    self.cfg1d(s_count * h),
                    In::Buf(z),
                    In::Buf(&hist_d),
                    In::Buf(&seg_start_d),
                    In::Buf(&seg_len_d),
                    Out::Buf(&mut scratch),
                    s_i,
                    c_i,
                    h_i,
                )
            }?;
            unsafe {
                be.kernels().store_windows(
                    stream,
                    self.cfg1d(s_count * h),
                    In::Buf(&scratch),
                    In::Buf(&hist_d),
                    s_i,
                    c_i,
                    h_i,
                )
            }?;
        }
        mark(&mut marks, "window")?;
        drop(guards);
        Ok(())
    }
}
