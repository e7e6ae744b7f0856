//! Where a decode step's time goes, for tuning (`XLSTM_WGPU_PROFILE=1`, used by the
//! `wgpu_decode_profile` example): the device writes a timestamp after every dispatch (wgpu's
//! TIMESTAMP_QUERY_INSIDE_PASSES) and the host counts what recording, submitting and waiting cost.
//!
//! Vulkan writes a pass timestamp once all earlier work has finished, so the interval between two
//! consecutive timestamps is what that dispatch added to the step: its own run, the barrier before
//! it, and any time the device sat idle waiting for the host (those show up on the first dispatch
//! of a submission, which is why samples say whether they opened one).
use std::time::Duration;

/// Timestamps per query set (wgpu's limit) and query sets: ~80 decode steps of a 32-layer model.
const PER_SET: u32 = 4096;
const SETS: u32 = 4;
const CAPACITY: u32 = PER_SET * SETS;

/// One dispatch's timing: its kernel, whether it opened a submission, and the device time between
/// the previous timestamp and its own (ns; the first sample after [`GpuProfiler::take`] has none).
#[derive(Clone, Debug)]
pub struct Sample {
    pub entry: &'static str,
    pub opens_submission: bool,
    pub ns: Option<f64>,
}

/// Host time spent by the backend since it was created.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostTimes {
    /// Recording dispatches (pipeline and bind-group lookups, parameters, pass commands).
    pub record: Duration,
    /// Ending passes, finishing command buffers, writing parameters and submitting.
    pub submit: Duration,
    /// Waiting for the device (downloads, syncs).
    pub wait: Duration,
}

pub(crate) struct GpuProfiler {
    sets: Vec<wgpu::QuerySet>,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
    period_ns: f64,
    marks: Vec<(&'static str, bool)>,
    /// Timestamps are written (paused while a caller times something else).
    pub(crate) on: bool,
}

impl GpuProfiler {
    /// The features profiling needs, when asked for and the adapter has them.
    pub(crate) fn features(adapter: &wgpu::Adapter) -> wgpu::Features {
        let want = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        let on = std::env::var("XLSTM_WGPU_PROFILE").is_ok_and(|v| v == "1");
        if on && adapter.features().contains(want) {
            want
        } else {
            wgpu::Features::empty()
        }
    }

    pub(crate) fn new(device: &wgpu::Device, queue: &wgpu::Queue) -> Option<Self> {
        let want = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        if !device.features().contains(want) {
            return None;
        }
        let sets = (0..SETS).map(|_| device.create_query_set(&wgpu::QuerySetDescriptor { label: Some("profile"), ty: wgpu::QueryType::Timestamp, count: PER_SET })).collect();
        let bytes = CAPACITY as u64 * 8;
        let resolve = device.create_buffer(&wgpu::BufferDescriptor { label: Some("profile"), size: bytes, usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC, mapped_at_creation: false });
        let read = device.create_buffer(&wgpu::BufferDescriptor { label: Some("profile"), size: bytes, usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false });
        Some(GpuProfiler { sets, resolve, read, period_ns: queue.get_timestamp_period() as f64, marks: Vec::new(), on: true })
    }

    /// Writes the timestamp that closes the dispatch just recorded (dropped past the capacity).
    pub(crate) fn mark(&mut self, pass: &mut wgpu::ComputePass<'static>, entry: &'static str, opens_submission: bool) {
        if self.on && (self.marks.len() as u32) < CAPACITY {
            let i = self.marks.len() as u32;
            pass.write_timestamp(&self.sets[(i / PER_SET) as usize], i % PER_SET);
            self.marks.push((entry, opens_submission));
        }
    }

    /// Records the copy of every timestamp so far into the readable buffer (in the encoder that
    /// is submitted last, after the passes that wrote them ended).
    pub(crate) fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        let n = self.marks.len() as u32;
        for (s, set) in self.sets.iter().enumerate() {
            let first = s as u32 * PER_SET;
            if n > first {
                encoder.resolve_query_set(set, 0..(n - first).min(PER_SET), &self.resolve, first as u64 * 8);
            }
        }
        if n > 0 {
            encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.read, 0, n as u64 * 8);
        }
    }

    /// Reads the resolved timestamps (the device must have finished the submission that resolved
    /// them) and starts over.
    pub(crate) fn take(&mut self, device: &wgpu::Device) -> Result<Vec<Sample>, String> {
        let n = self.marks.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let bytes = n as u64 * 8;
        let (tx, rx) = std::sync::mpsc::channel();
        self.read.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let _ = tx.send(r);
        });
        device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| format!("poll: {e}"))?;
        rx.recv().map_err(|_| "the map callback never ran".to_string())?.map_err(|e| e.to_string())?;
        let ticks: Vec<u64> = {
            let view = self.read.get_mapped_range(0..bytes).map_err(|e| format!("{e:?}"))?;
            bytemuck::cast_slice::<u8, u64>(&view).to_vec()
        };
        self.read.unmap();
        let samples = self
            .marks
            .drain(..)
            .enumerate()
            .map(|(i, (entry, opens_submission))| Sample {
                entry,
                opens_submission,
                ns: (i > 0).then(|| ticks[i].wrapping_sub(ticks[i - 1]) as f64 * self.period_ns),
            })
            .collect();
        Ok(samples)
    }
}
