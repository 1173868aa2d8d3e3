//! Timing events recorded between the stages of a forward
//! ([`CudaLayer::forward_device_profiled`](super::CudaLayer::forward_device_profiled)).

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};

use crate::error::{DriverResultExt, Result};

/// Timing events recorded between the stages of a forward.
pub(super) struct Marks {
    stream: Arc<CudaStream>,
    events: Vec<(&'static str, CudaEvent)>,
}

impl Marks {
    pub(super) fn new(stream: &Arc<CudaStream>) -> Self {
        Self {
            stream: stream.clone(),
            events: Vec::new(),
        }
    }
    pub(super) fn mark(&mut self, stage: &'static str) -> Result<()> {
        let ev = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .ctx("recording a timing event")?;
        self.events.push((stage, ev));
        Ok(())
    }
    /// Milliseconds between consecutive marks, named by the later one.
    pub(super) fn times(self) -> Result<Vec<(&'static str, f32)>> {
        self.events
            .windows(2)
            .map(|w| {
                w[0].1
                    .elapsed_ms(&w[1].1)
                    .map(|ms| (w[1].0, ms))
                    .ctx("reading timing events")
            })
            .collect()
    }
}

pub(super) fn mark(marks: &mut Option<&mut Marks>, stage: &'static str) -> Result<()> {
    match marks {
        Some(m) => m.mark(stage),
        None => Ok(()),
    }
}
