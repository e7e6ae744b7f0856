//! A portable GPU backend on `wgpu`: WGSL compute kernels that run on Vulkan (Linux, Windows), Metal
//! (macOS) and DX12 from one source, and on the CPU through Mesa's lavapipe Vulkan driver (CI).
//!
//! Memory: every [`WgpuBuf`] is an f32 storage buffer (padded to 32 bytes); weight matrices
//! ([`WgpuMat`]) keep bf16/f16 as packed u32 pairs (two values per word, widened in the shaders: no
//! SHADER_F16 needed) or f32, rows padded to 8 values, split by rows into parts no larger than the
//! adapter's storage-binding limit, placed one after another in pool buffers (`Knobs::pool_bytes`),
//! so the batch-1 GEMV reads several matrices of one pool in one dispatch.
//!
//! Recording: ops do not submit. Each op appends its dispatch to one pending command encoder (one
//! compute pass, reopened after copies); its 32 parameter words go in as immediate data where the
//! adapter has it, else into a host-side arena written to the GPU right before the submission.
//! Work is submitted where the host needs a result (`download`), where the parameter arena is
//! full, and every `XLSTM_WGPU_SUBMIT_EVERY` dispatches (GPU default 128, reached from 2 by
//! doubling once the device is idle, so the GPU starts on a step while the rest is encoded; CPU
//! adapters: 0, a decode step — embedding to logits — is then one command buffer and one
//! submission). Bind groups are cached by (pipeline, buffers), so a decode
//! step that reuses its preallocated activations creates none after the first.
//!
//! Shaders: `shaders/*.wgsl`, one file per op family, preprocessed into variants (weight dtype,
//! subgroup operations where the adapter has them, tile knobs); see [`shaders`].
pub mod profile;
pub mod shaders;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use profile::{GpuProfiler, HostTimes, Sample};
use shaders::{Knobs, Variant, WDType, GEMV_MAX_ROWS};
use xlstm_core::backend::{shapes, Activation, Backend, CHOSEN_ID, ConvDims, HeadwiseDims, MlstmDims, MlstmKernel, MlstmState, SlstmGates, SlstmState};
use xlstm_core::tensor::{DType, HostData, HostTensor};
use xlstm_core::{Error, Result};

/// Which wgpu backend to ask for (`--device vulkan|metal|dx12|gpu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// Any native backend wgpu has on this platform.
    Any,
    Vulkan,
    Metal,
    Dx12,
}

impl Api {
    pub fn backends(self) -> wgpu::Backends {
        match self {
            Api::Any => wgpu::Backends::VULKAN | wgpu::Backends::METAL | wgpu::Backends::DX12,
            Api::Vulkan => wgpu::Backends::VULKAN,
            Api::Metal => wgpu::Backends::METAL,
            Api::Dx12 => wgpu::Backends::DX12,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Api::Any => "gpu",
            Api::Vulkan => "vulkan",
            Api::Metal => "metal",
            Api::Dx12 => "dx12",
        }
    }
}

fn dev_err(what: impl std::fmt::Display) -> Error {
    Error::Device(format!("wgpu: {what}"))
}

fn check(op: &str, what: &str, have: usize, need: usize) -> Result<()> {
    shapes::len("wgpu", op, what, have, need)
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A device buffer; dropping the last handle lets cached bind groups that use it go.
struct Raw {
    id: u64,
    buf: wgpu::Buffer,
    dead: Arc<Mutex<Vec<u64>>>,
}

impl Drop for Raw {
    fn drop(&mut self) {
        if let Ok(mut d) = self.dead.lock() {
            d.push(self.id);
        }
    }
}

/// An f32 buffer on the device.
pub struct WgpuBuf {
    raw: Arc<Raw>,
    len: usize,
}

impl WgpuBuf {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One row block of a weight matrix: `bytes` at byte offset `off` of a pool buffer.
struct MatPart {
    raw: Arc<Raw>,
    off: u64,
    bytes: u64,
    row0: usize,
    rows: usize,
}

impl MatPart {
    /// The part as a binding of its own (the kernels that index from 0).
    fn bind(&self) -> Bind<'_> {
        Bind { raw: &self.raw, off: self.off, size: self.bytes }
    }
}

/// A buffer binding: all of `raw` (size 0) or `size` bytes from `off`.
#[derive(Clone, Copy)]
struct Bind<'a> {
    raw: &'a Arc<Raw>,
    off: u64,
    size: u64,
}

fn whole(raw: &Arc<Raw>) -> Bind<'_> {
    Bind { raw, off: 0, size: 0 }
}

/// The pool buffer weight parts are being placed in.
struct Pool {
    raw: Arc<Raw>,
    size: u64,
    used: u64,
}

/// A weight matrix `[rows, cols]` on the device (bf16/f16 packed in u32 pairs, or f32).
pub struct WgpuMat {
    parts: Vec<MatPart>,
    rows: usize,
    cols: usize,
    /// Row stride in values (cols rounded up to 8).
    kp: usize,
    dtype: WDType,
}

impl WgpuMat {
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// One matrix part of a batch-1 GEMV dispatch and where its rows go.
struct Slot<'a> {
    part: &'a MatPart,
    wide: bool,
    out: &'a Arc<Raw>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Acc {
    R,
    W,
}

/// Storage bindings of each entry point, in the order the op passes its buffers: (binding, access).
fn bindings(entry: &str) -> &'static [(u32, Acc)] {
    use Acc::*;
    match entry {
        "gemv" | "gemm" | "embed" | "rms_norm" => &[(1, R), (2, R), (3, W)],
        "mv" | "mv_norm" | "mv_pair" => &[(1, R), (2, R), (3, R), (4, R), (5, W), (6, W), (7, W), (8, W), (9, W), (10, W), (11, W)],
        "group_norm" => &[(1, R), (2, R), (4, R), (5, R), (6, W)],
        "bias_soft_cap" => &[(1, W), (2, R)],
        "add" => &[(3, W), (4, R)],
        "gated_act" => &[(5, R), (6, R), (7, W)],
        "sigmoid_gate" => &[(8, R), (9, W)],
        "scaled_add" => &[(10, W), (11, R), (12, R)],
        "copy_cols" => &[(13, R), (14, W)],
        "stream_copy" | "stream_read" => &[(1, R), (2, W)],
        "headwise" => &[(15, R), (16, R), (17, R), (18, W)],
        "conv_out" => &[(1, R), (2, R), (3, R), (4, R), (5, W)],
        "conv_state" => &[(1, R), (6, W)],
        "mlstm_gates" => &[(1, R), (2, R), (3, R), (4, R), (5, R), (6, R), (7, W), (8, W), (9, W)],
        "mlstm_cell" => &[(1, R), (2, R), (10, R), (11, W), (12, R), (13, W)],
        "mlstm_cell_fused" => &[(1, R), (2, R), (3, R), (4, R), (5, R), (6, R), (7, W), (8, W), (9, W), (10, R), (11, W), (13, W)],
        "mlstm_norm" => &[(2, R), (7, W), (8, W), (9, W), (13, W), (14, R), (15, R), (16, W)],
        "mlstm_step_normed" => &[(1, R), (2, R), (3, R), (4, R), (5, R), (6, R), (7, W), (8, W), (9, W), (10, R), (11, W), (13, W), (14, R), (15, R), (16, W), (17, W)],
        "mlstm_chunk_states" => &[(2, R), (3, R), (4, R), (5, R), (6, W), (7, W), (8, W), (9, W), (10, W), (11, W)],
        "mlstm_chunk_out" => &[(1, R), (2, R), (3, R), (4, R), (5, R), (8, W), (9, W), (10, W), (11, W), (12, W)],
        "top_k" => &[(1, R), (2, W)],
        "top1_merge" => &[(2, W), (3, W)],
        "slstm" => &[(1, R), (2, R), (3, R), (4, R), (5, R), (6, R), (7, W), (8, W), (9, W), (10, W), (11, W)],
        other => panic!("no binding table for entry point `{other}`"),
    }
}

fn file_of(entry: &str) -> &'static str {
    match entry {
        "gemv" => "gemv",
        "mv" | "mv_norm" | "mv_pair" => "mv",
        "stream_copy" | "stream_read" => "stream",
        "gemm" => "gemm",
        "embed" => "embed",
        "rms_norm" | "group_norm" => "norm",
        "conv_out" | "conv_state" => "conv",
        "mlstm_gates" | "mlstm_cell" | "mlstm_cell_fused" | "mlstm_norm" | "mlstm_step_normed" => "mlstm",
        "mlstm_chunk_states" | "mlstm_chunk_out" => "mlstm_chunk",
        "top_k" | "top1_merge" => "topk",
        "slstm" => "slstm",
        _ => "elementwise",
    }
}

/// The flavour switches and the WGSL entry point of an op's kernel.
fn flavour_of(entry: &'static str) -> (&'static [&'static str], &'static str) {
    match entry {
        "mv" => (shaders::MV_FLAVOURS[0], "mv"),
        "mv_norm" => (shaders::MV_FLAVOURS[1], "mv"),
        "mv_pair" => (shaders::MV_FLAVOURS[2], "mv"),
        "mlstm_step_normed" => (shaders::MLSTM_FLAVOURS[1], "mlstm_cell_fused"),
        other => (&[], other),
    }
}

/// Slots of one batch-1 GEMV dispatch (the kernel has 6 output bindings).
const MV_SLOTS: usize = 6;

struct Pipe {
    uid: usize,
    pipeline: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    bindings: &'static [(u32, Acc)],
}

/// The recording state: pending encoder and pass, parameter arena, caches.
struct Rec {
    encoder: Option<wgpu::CommandEncoder>,
    pass: Option<wgpu::ComputePass<'static>>,
    params: Vec<u8>,
    pipes: HashMap<(&'static str, WDType), Arc<Pipe>>,
    groups: HashMap<(usize, Vec<u64>), (wgpu::BindGroup, Vec<u64>)>,
    scratch: HashMap<&'static str, WgpuBuf>,
    staging: Option<(wgpu::Buffer, u64)>,
    submissions: u64,
    dispatches: u64,
    /// Dispatches recorded since the last submission.
    pending: u64,
    /// The host waited for the device (download, sync) and nothing was submitted since: the device
    /// is idle, so the next submission comes after `submit_first` dispatches.
    idle: bool,
    /// Dispatches the next submission waits for when the device is busy: `submit_first` doubled
    /// per submission up to `submit_every` with the ramp on, else `submit_every`.
    submit_next: u64,
    /// Host time spent recording, submitting and waiting.
    host: HostTimes,
    /// Device timestamps after every dispatch (`XLSTM_WGPU_PROFILE=1`).
    prof: Option<GpuProfiler>,
    /// The last submission (what a chosen-ids ticket waits for).
    last_submission: Option<wgpu::SubmissionIndex>,
}

/// Parameter words per dispatch, and the arena's size.
const PARAM_WORDS: usize = 32;
const ARENA_BYTES: u64 = 4 << 20;
/// Longest chunk of the chunkwise prefill (its workgroup tiles: `shaders/mlstm_chunk.wgsl`).
const CHUNK_MAX: usize = 32;
/// Token ids an embedding dispatch takes in its parameter words (after its 4 own).
const EMBED_INLINE_IDS: usize = PARAM_WORDS - 4;

pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    subgroup: bool,
    knobs: Knobs,
    api: Api,
    arena: wgpu::Buffer,
    align: usize,
    dummy: WgpuBuf,
    /// A second dummy for unused writable bindings (one buffer may not be bound both read-only
    /// and writable in one dispatch).
    dummy_w: WgpuBuf,
    dead: Arc<Mutex<Vec<u64>>>,
    pool: Mutex<Option<Pool>>,
    /// Upload bytes written since the last submission (staging memory held by the queue).
    unflushed: AtomicU64,
    /// Matrix bytes the model announced and has not placed yet (`expect_matrix_bytes`): the last
    /// pool is made no larger than what is left.
    expected: AtomicU64,
    /// The fused batch-1 kernels fit this adapter (11 storage buffers per stage) and are on.
    fused: bool,
    /// The gated decode mLSTM step runs as two dispatches (12 storage buffers per stage, fusion on).
    fused_cell: bool,
    /// ... or as one (16 storage buffers per stage, `Knobs::cell_norm`).
    normed_cell: bool,
    rec: Mutex<Rec>,
    submit_every: u64,
    /// Dispatches of the first submission after the host waited for the device.
    submit_first: u64,
    /// After an idle device, submissions grow from `submit_first` by doubling (XLSTM_WGPU_SUBMIT_RAMP).
    submit_ramp: bool,
    /// Largest weight part in bytes (the storage-binding limit unless lowered, e.g. by tests).
    part_limit: u64,
    /// Greedy decoding on the device: the ids chosen last and their read-backs in flight.
    chosen: Mutex<Chosen>,
}

/// The ids `head_top1_chosen` chose last (u32 per row, on the device: what `embed` reads for
/// `CHOSEN_ID`) and the read-back buffers, each free or holding a ticket's ids.
#[derive(Default)]
struct Chosen {
    ids: Option<WgpuBuf>,
    readbacks: Vec<(wgpu::Buffer, Option<Ticket>)>,
    next_ticket: u64,
}

struct Ticket {
    id: u64,
    rows: usize,
    submission: wgpu::SubmissionIndex,
}

/// The adapters wgpu sees for `api`, best first (discrete GPU, integrated, virtual, CPU).
pub fn adapters(api: Api) -> Vec<wgpu::Adapter> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = api.backends();
    let instance = wgpu::Instance::new(desc);
    let mut list = futures::executor::block_on(instance.enumerate_adapters(api.backends()));
    let rank = |a: &wgpu::Adapter| match a.get_info().device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    list.sort_by_key(rank);
    list
}

/// Whether an adapter for `api` is present (for `--device auto` and the tests' skip).
pub fn probe(api: Api) -> Result<String> {
    match adapters(api).first() {
        Some(a) => {
            let i = a.get_info();
            Ok(format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type))
        }
        None => Err(dev_err(format!("no {} adapter found (is a {} driver installed?)", api.name(), match api {
            Api::Vulkan | Api::Any => "Vulkan (e.g. mesa-vulkan-drivers + libvulkan1, or the GPU vendor's)",
            Api::Metal => "Metal (macOS)",
            Api::Dx12 => "DirectX 12 (Windows)",
        }))),
    }
}

/// As [`probe`], but only a hardware GPU counts (not a CPU adapter such as lavapipe): what
/// `--device auto` asks before it takes the wgpu backend.
pub fn probe_gpu(api: Api) -> Result<String> {
    match adapters(api).into_iter().find(|a| a.get_info().device_type != wgpu::DeviceType::Cpu) {
        Some(a) => Ok(a.get_info().name),
        None => Err(dev_err(format!("no {} GPU adapter", api.name()))),
    }
}

impl WgpuBackend {
    /// Opens the best adapter of `api` (`XLSTM_WGPU_ADAPTER=substring` picks one by name), with
    /// subgroup operations where the adapter has them (`XLSTM_WGPU_NO_SUBGROUP=1` turns them off).
    pub fn new(api: Api) -> Result<Self> {
        Self::with_subgroups(api, std::env::var("XLSTM_WGPU_NO_SUBGROUP").is_err())
    }

    /// As [`WgpuBackend::new`]; `subgroups: false` builds the workgroup-memory fallback kernels
    /// even where the adapter has subgroup operations.
    pub fn with_subgroups(api: Api, subgroups: bool) -> Result<Self> {
        Self::with_options(api, subgroups, None)
    }

    /// As [`WgpuBackend::with_subgroups`], with the tile knobs given (None: per-adapter defaults and
    /// the `XLSTM_WGPU_*` overrides).
    pub fn with_options(api: Api, subgroups: bool, knobs: Option<Knobs>) -> Result<Self> {
        let list = adapters(api);
        let adapter = match std::env::var("XLSTM_WGPU_ADAPTER") {
            Ok(want) if !want.is_empty() => list
                .into_iter()
                .find(|a| a.get_info().name.to_lowercase().contains(&want.to_lowercase()))
                .ok_or_else(|| dev_err(format!("no {} adapter whose name contains `{want}`", api.name())))?,
            _ => list.into_iter().next().ok_or_else(|| probe(api).unwrap_err())?,
        };
        let info = adapter.get_info();
        let limits = adapter.limits();
        let subgroup = subgroups && adapter.features().contains(wgpu::Features::SUBGROUP);
        let mut features = if subgroup { wgpu::Features::SUBGROUP } else { wgpu::Features::empty() } | GpuProfiler::features(&adapter);
        let mut knobs = knobs.unwrap_or_else(|| Knobs::for_adapter(info.device_type == wgpu::DeviceType::Cpu).with_env());
        knobs.immediates &= adapter.features().contains(wgpu::Features::IMMEDIATES) && limits.max_immediate_size >= (PARAM_WORDS * 4) as u32;
        if knobs.immediates {
            features |= wgpu::Features::IMMEDIATES;
        }
        let (device, queue) = futures::executor::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("xlstm"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| dev_err(format!("cannot open {}: {e}", info.name)))?;

        // A cell tile over this adapter's workgroup limit gets fewer DK slices.
        while knobs.cell_cols * knobs.cell_split > limits.max_compute_invocations_per_workgroup && knobs.cell_split > 1 {
            knobs.cell_split /= 2;
        }
        // Submit every N dispatches (0: only where the host needs a result): lets the GPU start on a
        // long recording while the host still records (XLSTM_WGPU_SUBMIT_EVERY).
        // Default on GPUs: every 128 dispatches, reached by the ramp below (the GPU starts on a
        // decode step's first layers while wgpu encodes the rest; each submission boundary costs
        // the device ~15 µs, so few; 7B decode on an H200, ms per token: 256 5.43, 128 5.45–5.46,
        // 64 5.47, 32 5.52, one submission per step 6.36); CPU adapters: 0.
        let cpu = info.device_type == wgpu::DeviceType::Cpu;
        let submit_every = std::env::var("XLSTM_WGPU_SUBMIT_EVERY").ok().and_then(|v| v.parse().ok()).unwrap_or(if cpu { 0 } else { 128 });
        // After the host waited (a decode step's logits), the device is idle: the first submission
        // goes after a few dispatches (XLSTM_WGPU_SUBMIT_FIRST, default 2), the rest every N.
        let submit_first = std::env::var("XLSTM_WGPU_SUBMIT_FIRST").ok().and_then(|v| v.parse::<u64>().ok()).unwrap_or(2).clamp(1, submit_every.max(1));
        // Then 4, 8, 16, … dispatches per submission up to N: the device, idle at the step's start,
        // gets work in growing pieces while the host records ahead (XLSTM_WGPU_SUBMIT_RAMP=0: N).
        let submit_ramp = std::env::var("XLSTM_WGPU_SUBMIT_RAMP").map_or(true, |v| v != "0");
        let align = limits.min_uniform_buffer_offset_alignment.max(PARAM_WORDS as u32 * 4) as usize;
        let arena = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("params"),
            size: ARENA_BYTES,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let dead = Arc::new(Mutex::new(Vec::new()));
        let dummy = make_buf(&device, &dead, 4, None);
        let dummy_w = make_buf(&device, &dead, 4, None);
        let fused = knobs.fuse && limits.max_storage_buffers_per_shader_stage >= 11;
        let fused_cell = knobs.fuse && limits.max_storage_buffers_per_shader_stage >= 12;
        if info.backend == wgpu::Backend::Metal && std::env::var("XLSTM_WGPU_CELL_NORM").is_err() {
            knobs.cell_norm = false;
        }
        let normed_cell = fused_cell && knobs.cell_norm && limits.max_storage_buffers_per_shader_stage >= 16;
        // Rounded down to 32 bytes, as pools are: NVIDIA's Vulkan binding limit is 2^31 − 4.
        let part_limit = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size) / 32 * 32;
        let prof = GpuProfiler::new(&device, &queue);
        Ok(WgpuBackend {
            device,
            queue,
            info,
            limits,
            subgroup,
            knobs,
            api,
            arena,
            align,
            dummy,
            dummy_w,
            dead,
            pool: Mutex::new(None),
            unflushed: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            fused,
            fused_cell,
            normed_cell,
            part_limit,
            chosen: Mutex::new(Chosen::default()),
            submit_every,
            submit_first,
            submit_ramp,
            rec: Mutex::new(Rec {
                encoder: None,
                pass: None,
                params: Vec::new(),
                pipes: HashMap::new(),
                groups: HashMap::new(),
                scratch: HashMap::new(),
                staging: None,
                submissions: 0,
                dispatches: 0,
                pending: 0,
                idle: true,
                submit_next: submit_every,
                host: HostTimes::default(),
                prof,
                last_submission: None,
            }),
        })
    }

    /// Splits weight matrices into row blocks of at most `bytes` (tests use it to exercise parts).
    pub fn set_part_limit(&mut self, bytes: u64) {
        self.part_limit = bytes.clamp(64, self.max_binding());
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }
    pub fn has_subgroups(&self) -> bool {
        self.subgroup
    }
    pub fn knobs(&self) -> &Knobs {
        &self.knobs
    }
    /// Dispatches per submission while recording (0: one submission where the host needs a result).
    pub fn submit_every(&self) -> u64 {
        self.submit_every
    }
    /// Dispatches of the first submission after the host waited for the device.
    pub fn submit_first(&self) -> u64 {
        self.submit_first
    }
    /// Sets the submission pacing the `XLSTM_WGPU_SUBMIT_*` variables set at creation (for tuning):
    /// every `every` dispatches (0: only where the host needs a result), the first after `first`
    /// once the device is idle, growing by doubling from there with `ramp`.
    pub fn set_submission(&mut self, every: u64, first: u64, ramp: bool) {
        let mut rec = self.lock();
        self.flush(&mut rec);
        drop(rec);
        self.submit_every = every;
        self.submit_first = first.clamp(1, every.max(1));
        self.submit_ramp = ramp;
    }
    /// Pauses or resumes the device timestamps (when profiling at all).
    pub fn set_profiling(&self, on: bool) {
        if let Some(p) = self.lock().prof.as_mut() {
            p.on = on;
        }
    }
    /// Whether submissions after an idle device grow by doubling (see `submit_first`).
    pub fn submit_ramp(&self) -> bool {
        self.submit_ramp
    }
    /// (submissions, dispatches) so far: what a decode step costs in command traffic.
    pub fn counters(&self) -> (u64, u64) {
        let r = self.lock();
        (r.submissions, r.dispatches)
    }

    fn lock(&self) -> MutexGuard<'_, Rec> {
        self.rec.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    fn new_buf(&self, len: usize, data: Option<&[u8]>) -> Result<WgpuBuf> {
        let bytes = (len.max(1) * 4) as u64;
        if bytes > self.max_binding() {
            return Err(dev_err(format!("a buffer of {len} f32 ({bytes} bytes) is over this adapter's storage-binding limit of {} bytes", self.max_binding())));
        }
        Ok(make_buf(&self.device, &self.dead, len, data))
    }

    fn pipe(&self, rec: &mut Rec, entry: &'static str, dtype: WDType) -> Arc<Pipe> {
        if let Some(p) = rec.pipes.get(&(entry, dtype)) {
            return p.clone();
        }
        let (extra, entry_point) = flavour_of(entry);
        let variant = Variant { file: file_of(entry), dtype, subgroup: self.subgroup, extra };
        let src = shaders::source(&variant, &self.knobs);
        let desc = wgpu::ShaderModuleDescriptor { label: Some(entry), source: wgpu::ShaderSource::Wgsl(src.into()) };
        let module = if matches!(variant.file, "mv" | "stream") && !self.knobs.checked {
            // SAFETY: stream.wgsl reads and writes below its length parameter (≤ both buffers);
            // mv.wgsl indexes only in range by construction: weight rows are clamped to
            // their slot, chunks stay below ceil(k/8) of rows padded to 8 values, x and g are read
            // up to ceil(k/8)·8 values of buffers padded to 32 bytes and holding ≥ k (checked by
            // the host), outputs are written below the sizes the host checked, workgroup memory
            // below WG·NV; every loop is bounded and no divisor is zero (R, WG, the subgroup size).
            unsafe { self.device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
        } else {
            self.device.create_shader_module(desc)
        };
        let bl = bindings(entry);
        let mut entries = Vec::new();
        if !self.knobs.immediates {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: wgpu::BufferSize::new((PARAM_WORDS * 4) as u64),
                },
                count: None,
            });
        }
        for &(b, acc) in bl {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: b,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only: acc == Acc::R },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(entry), entries: &entries });
        let pl = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(entry),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: if self.knobs.immediates { (PARAM_WORDS * 4) as u32 } else { 0 },
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: Some(&pl),
            module: &module,
            entry_point: Some(entry_point),
            compilation_options: wgpu::PipelineCompilationOptions { constants: &[], zero_initialize_workgroup_memory: false },
            cache: None,
        });
        let p = Arc::new(Pipe { uid: rec.pipes.len(), pipeline, layout, bindings: bl });
        rec.pipes.insert((entry, dtype), p.clone());
        p
    }

    /// Records one dispatch of `entry` over `bufs` (in the order of its binding table).
    fn dispatch(&self, entry: &'static str, dtype: WDType, bufs: &[&Arc<Raw>], params: &[u32], groups: (u32, u32, u32)) -> Result<()> {
        let binds: Vec<Bind<'_>> = bufs.iter().map(|b| whole(b)).collect();
        self.dispatch_binds(entry, dtype, &binds, params, groups)
    }

    /// As [`Self::dispatch`], with buffer ranges.
    fn dispatch_binds(&self, entry: &'static str, dtype: WDType, bufs: &[Bind<'_>], params: &[u32], groups: (u32, u32, u32)) -> Result<()> {
        if groups.0 == 0 || groups.1 == 0 || groups.2 == 0 {
            return Ok(());
        }
        let mut guard = self.lock();
        let rec = &mut *guard;
        let t0 = std::time::Instant::now();
        let pipe = self.pipe(rec, entry, dtype);
        assert_eq!(bufs.len(), pipe.bindings.len(), "{entry}: wrong number of buffers");
        let mut words = [0u32; PARAM_WORDS];
        words[..params.len()].copy_from_slice(params);
        let imm = self.knobs.immediates;
        if !imm && rec.params.len() + self.align > ARENA_BYTES as usize {
            self.flush(rec);
        }
        let off = rec.params.len();
        if !imm {
            rec.params.extend_from_slice(bytemuck::cast_slice(&words));
            rec.params.resize(off + self.align, 0);
        }
        let key = (pipe.uid, bufs.iter().flat_map(|b| [b.raw.id, b.off, b.size]).collect::<Vec<_>>());
        if !rec.groups.contains_key(&key) {
            let mut entries = Vec::new();
            if !imm {
                entries.push(wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: &self.arena, offset: 0, size: wgpu::BufferSize::new((PARAM_WORDS * 4) as u64) }),
                });
            }
            for (&(b, _), bind) in pipe.bindings.iter().zip(bufs) {
                let resource = if bind.size == 0 {
                    bind.raw.buf.as_entire_binding()
                } else {
                    wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: &bind.raw.buf, offset: bind.off, size: wgpu::BufferSize::new(bind.size) })
                };
                entries.push(wgpu::BindGroupEntry { binding: b, resource });
            }
            let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipe.layout, entries: &entries });
            let ids = bufs.iter().map(|b| b.raw.id).collect();
            rec.groups.insert(key.clone(), (bg, ids));
        }
        let bg = rec.groups[&key].0.clone();
        let pass = open_pass(&self.device, rec);
        pass.set_pipeline(&pipe.pipeline);
        if imm {
            pass.set_immediates(0, bytemuck::cast_slice(&words));
            pass.set_bind_group(0, &bg, &[]);
        } else {
            pass.set_bind_group(0, &bg, &[off as u32]);
        }
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        if let (Some(p), Some(pass)) = (rec.prof.as_mut(), rec.pass.as_mut()) {
            p.mark(pass, entry, rec.pending == 0);
        }
        rec.dispatches += 1;
        rec.pending += 1;
        rec.host.record += t0.elapsed();
        if self.submit_every > 0 && rec.pending >= if rec.idle { self.submit_first } else { rec.submit_next } {
            self.flush(rec);
        }
        Ok(())
    }

    /// Ends the pass, writes the parameter arena and submits the pending encoder (if any).
    fn flush(&self, rec: &mut Rec) {
        let t0 = std::time::Instant::now();
        rec.pass = None;
        rec.idle = false;
        if let Some(enc) = rec.encoder.take() {
            if !rec.params.is_empty() {
                self.queue.write_buffer(&self.arena, 0, &rec.params);
            }
            rec.last_submission = Some(self.queue.submit([enc.finish()]));
            rec.submissions += 1;
            rec.submit_next = if self.submit_ramp { (rec.pending * 2).clamp(1, self.submit_every.max(1)) } else { self.submit_every };
            rec.pending = 0;
        }
        rec.params.clear();
        let dead: Vec<u64> = std::mem::take(&mut *self.dead.lock().unwrap_or_else(|e| e.into_inner()));
        if !dead.is_empty() {
            rec.groups.retain(|_, (_, ids)| !ids.iter().any(|i| dead.contains(i)));
        }
        rec.host.submit += t0.elapsed();
    }

    /// Waits for the device to finish everything submitted, counted as host wait time.
    fn wait(&self, rec: &mut Rec) -> Result<()> {
        let t0 = std::time::Instant::now();
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| dev_err(format!("poll: {e}")))?;
        rec.host.wait += t0.elapsed();
        Ok(())
    }

    /// Host time spent recording, submitting and waiting since the backend was created.
    pub fn host_times(&self) -> HostTimes {
        self.lock().host
    }

    /// Whether device timestamps are being written (`XLSTM_WGPU_PROFILE=1` and an adapter with
    /// timestamp queries inside passes).
    pub fn profiling(&self) -> bool {
        self.lock().prof.is_some()
    }

    /// Submits everything recorded, waits, and returns the per-dispatch device timings since the
    /// last call (empty when not profiling); see [`profile`].
    pub fn profile_take(&self) -> Result<Vec<Sample>> {
        let mut guard = self.lock();
        let rec = &mut *guard;
        if rec.prof.is_none() {
            return Ok(Vec::new());
        }
        rec.pass = None;
        let enc = rec.encoder.get_or_insert_with(|| self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("xlstm") }));
        rec.prof.as_ref().expect("checked above").resolve(enc);
        self.flush(rec);
        rec.idle = true;
        self.wait(rec)?;
        rec.prof.as_mut().expect("checked above").take(&self.device).map_err(|e| dev_err(format!("profile: {e}")))
    }

    /// Submits everything recorded so far and waits for the device to finish it.
    pub fn sync(&self) -> Result<()> {
        let mut rec = self.lock();
        self.flush(&mut rec);
        rec.idle = true;
        self.wait(&mut rec)
    }

    /// Places a weight part's words in the current pool buffer (a new pool when it is full);
    /// returns the pool and the byte offset.
    fn place(&self, words: &[u32]) -> Result<(Arc<Raw>, u64)> {
        let bytes = (words.len() * 4) as u64;
        let align = (self.limits.min_storage_buffer_offset_alignment as u64).max(256);
        let mut guard = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let fits = guard.as_ref().is_some_and(|p| p.used.next_multiple_of(align) + bytes <= p.size);
        let left = self.expected.fetch_sub(bytes.min(self.expected.load(Ordering::Relaxed)), Ordering::Relaxed);
        if !fits {
            // Up to the pool size, but no more than the announced bytes still to come (plus the
            // rows' padding to 8 values and the alignment: 1/64 + 1 MiB).
            let want = if left > 0 { self.knobs.pool_bytes.min(left + left / 64 + (1 << 20)) } else { self.knobs.pool_bytes };
            // (rounded down to 32 bytes under the limit: NVIDIA's Vulkan binding limit is 2^31 − 4)
            let size = bytes.next_multiple_of(32).max(want.min(self.max_binding()) / 32 * 32);
            if size > self.max_binding() {
                return Err(dev_err(format!("a weight block of {bytes} bytes is over this adapter's storage-binding limit of {} bytes", self.max_binding())));
            }
            let b = make_buf(&self.device, &self.dead, (size / 4) as usize, None);
            *guard = Some(Pool { raw: b.raw, size, used: 0 });
        }
        let pool = guard.as_mut().expect("made above");
        let off = pool.used.next_multiple_of(align);
        pool.used = off + bytes;
        self.queue.write_buffer(&pool.raw.buf, off, bytemuck::cast_slice(words));
        self.unflushed.fetch_add(bytes, Ordering::Relaxed);
        Ok((pool.raw.clone(), off))
    }

    /// The 16-bit weight type a batch-1 GEMV over these matrices is built for (f32 matrices are a
    /// per-slot switch of either); None where bf16 and f16 mix.
    fn mv_dtype<'a>(mats: impl Iterator<Item = &'a WgpuMat>) -> Option<WDType> {
        let (mut bf, mut f16) = (false, false);
        for m in mats {
            bf |= m.dtype == WDType::BF16;
            f16 |= m.dtype == WDType::F16;
        }
        match (bf, f16) {
            (true, true) => None,
            (false, true) => Some(WDType::F16),
            _ => Some(WDType::BF16),
        }
    }

    /// Records batch-1 GEMV dispatches (`mv.wgsl`) of the matrix parts in `slots` over `x` (`k`
    /// values): parts of one pool share a dispatch, up to 6 a dispatch. `norm`: (weight, eps) of an
    /// RMSNorm fused in, and `xn` receives the normalised x (from the first dispatch). `up`: the
    /// gate/up pair flavour, `up[i]` read with `slots[i]` and `act` applied (one dispatch a pair).
    #[allow(clippy::too_many_arguments)]
    fn mv(&self, entry: &'static str, x: &WgpuBuf, k: usize, slots: &[Slot<'_>], norm: Option<(&WgpuBuf, f32)>, xn: Option<&WgpuBuf>, accumulate: bool, up: Option<&[&MatPart]>, act: u32, d16: WDType) -> Result<()> {
        check(entry, "x", x.len, k)?;
        if let Some((g, _)) = norm {
            check(entry, "weight", g.len, k)?;
        }
        if let Some(b) = xn {
            check(entry, "xn", b.len, k)?;
        }
        let r = self.knobs.mv_shape(entry == "mv").1 as u64;
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, sl) in slots.iter().enumerate() {
            match groups.last_mut() {
                Some(g) if up.is_none() && g.len() < MV_SLOTS && slots[g[0]].part.raw.id == sl.part.raw.id => g.push(i),
                _ => groups.push(vec![i]),
            }
        }
        let mut write_xn = xn.is_some();
        for g in groups {
            let mut params = [0u32; PARAM_WORDS];
            params[0] = k as u32;
            params[1] = write_xn as u32 | (accumulate as u32) << 1;
            params[2] = norm.map_or(0.0f32, |n| n.1).to_bits();
            params[3] = g.len() as u32;
            params[4] = act;
            let mut blocks = 0u64;
            for (s, &i) in g.iter().enumerate() {
                let sl = &slots[i];
                params[8 + s] = sl.part.rows as u32 | (sl.wide as u32) << 31;
                params[16 + s] = (sl.part.off / 16) as u32;
                params[24 + s] = sl.part.row0 as u32;
                blocks += (sl.part.rows as u64).div_ceil(r);
            }
            let pool = &slots[g[0]].part.raw;
            let wb = match up {
                Some(u) => {
                    let p = u[g[0]];
                    params[17] = (p.off / 16) as u32;
                    whole(&p.raw)
                }
                None => whole(&self.dummy.raw),
            };
            let mut binds = vec![whole(pool), wb, whole(&x.raw), whole(norm.map_or(&self.dummy.raw, |n| &n.0.raw)), whole(xn.map_or(&self.dummy_w.raw, |b| &b.raw))];
            for s in 0..MV_SLOTS {
                binds.push(whole(g.get(s).map_or(&self.dummy_w.raw, |&i| slots[i].out)));
            }
            self.dispatch_binds(entry, d16, &binds, &params, split(blocks))?;
            write_xn = false;
        }
        Ok(())
    }

    /// Internal scratch buffer of at least `len` values (kept and reused).
    fn scratch(&self, name: &'static str, len: usize) -> Result<Arc<Raw>> {
        let mut rec = self.lock();
        if let Some(b) = rec.scratch.get(name) {
            if b.len >= len {
                return Ok(b.raw.clone());
            }
        }
        let b = self.new_buf(len, None)?;
        let raw = b.raw.clone();
        rec.scratch.insert(name, b);
        Ok(raw)
    }

    fn grid_stride(&self, len: usize, wg: u32) -> (u32, u32, u32) {
        (((len as u64).div_ceil(wg as u64)).clamp(1, 65535) as u32, 1, 1)
    }

    fn mm(&self, x: &WgpuBuf, rows: usize, w: &WgpuMat, out: &WgpuBuf, accumulate: bool) -> Result<()> {
        check("matmul", "x", x.len, rows * w.cols)?;
        check("matmul", "out", out.len, rows * w.rows)?;
        if rows == 0 {
            return Ok(());
        }
        if rows == 1 && self.fused {
            let slots: Vec<Slot<'_>> = w.parts.iter().map(|part| Slot { part, wide: w.dtype == WDType::F32, out: &out.raw }).collect();
            for p in &w.parts {
                check("matmul", "out", out.len, p.row0 + p.rows)?;
            }
            return self.mv("mv", x, w.cols, &slots, None, None, accumulate, None, 0, Self::mv_dtype(std::iter::once(w)).unwrap_or(WDType::BF16));
        }
        let k = &self.knobs;
        for p in &w.parts {
            if rows <= GEMV_MAX_ROWS {
                let per = match w.dtype {
                    WDType::F32 => 4,
                    _ => 8,
                };
                let groups = (p.rows as u64).div_ceil(k.gemv_rows as u64);
                let params = [p.rows as u32, w.cols as u32, rows as u32, (w.kp / per) as u32, w.rows as u32, p.row0 as u32, accumulate as u32];
                self.dispatch_binds("gemv", w.dtype, &[p.bind(), whole(&x.raw), whole(&out.raw)], &params, split(groups))?;
            } else {
                let (bm, bn) = k.gemm;
                if !Knobs::gemm_ok(bm, bn) {
                    return Err(dev_err(format!("matmul: no GEMM tile {bm}x{bn} (BM 32 or 64, BN 32 to 256, BM·BN/32 ≤ 256)")));
                }
                let need = k.gemm_workgroup_bytes();
                if self.limits.max_compute_workgroup_storage_size < need || self.limits.max_compute_invocations_per_workgroup < bm * bn / 32 {
                    return Err(dev_err(format!(
                        "matmul: the prefill GEMM tile {bm}x{bn} needs {need} bytes of workgroup memory and {} invocations; this adapter has {} and {} (a smaller tile: XLSTM_WGPU_GEMM=32x64, or --device cpu)",
                        bm * bn / 32,
                        self.limits.max_compute_workgroup_storage_size,
                        self.limits.max_compute_invocations_per_workgroup
                    )));
                }
                let params = [p.rows as u32, w.cols as u32, rows as u32, w.kp as u32, w.rows as u32, p.row0 as u32, accumulate as u32];
                let gx = (p.rows as u32).div_ceil(bn);
                let gy = (rows as u32).div_ceil(bm);
                self.dispatch_binds("gemm", w.dtype, &[p.bind(), whole(&x.raw), whole(&out.raw)], &params, (gx, gy, 1))?;
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn mlstm_steps(&self, d: MlstmDims, batch: usize, rows: usize, q: &WgpuBuf, k: &WgpuBuf, v: &WgpuBuf, i: &WgpuBuf, f: &WgpuBuf, bias: Option<(&WgpuBuf, &WgpuBuf, f32)>, s: &mut MlstmState<WgpuBuf>, eps: f32, h: &mut WgpuBuf) -> Result<()> {
        let op = "mlstm";
        let nh = d.heads;
        shapes::mlstm("wgpu", op, d, rows, batch, [q.len, k.len, v.len, i.len, f.len, h.len], [s.c.len, s.n.len, s.m.len], s.c_dtype, &[DType::F32])?;
        let units = batch * nh;
        let scal = self.scratch("mlstm_scal", units * 4)?;
        let (ib, fb, cap, gb) = match bias {
            Some((ib, fb, cap)) => {
                check(op, "ibias", ib.len, nh)?;
                check(op, "fbias", fb.len, nh)?;
                (&ib.raw, &fb.raw, cap, 1u32)
            }
            None => (&self.dummy.raw, &self.dummy.raw, 0.0, 0u32),
        };
        let steps = rows / batch;
        let kn = &self.knobs;
        for t in 0..steps {
            let params = [nh as u32, d.dk as u32, d.dv as u32, units as u32, eps.to_bits(), t as u32, gb, cap.to_bits()];
            self.dispatch("mlstm_gates", WDType::F32, &[&q.raw, &k.raw, &i.raw, &f.raw, ib, fb, &s.n.raw, &s.m.raw, &scal], &params, split(units as u64))?;
            self.dispatch("mlstm_cell", WDType::F32, &[&q.raw, &k.raw, &v.raw, &s.c.raw, &scal, &h.raw], &params, ((d.dv as u32).div_ceil(kn.cell_cols), units as u32, 1))?;
        }
        Ok(())
    }

    /// Records a copy of `bytes` from `src` to `dst` after everything recorded so far, and submits.
    fn submit_copy(&self, rec: &mut Rec, src: &wgpu::Buffer, dst: &wgpu::Buffer, bytes: u64) {
        rec.pass = None;
        if rec.encoder.is_none() {
            rec.encoder = Some(self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("xlstm") }));
        }
        rec.encoder.as_mut().expect("made above").copy_buffer_to_buffer(src, 0, dst, 0, bytes);
        self.flush(rec);
    }

    /// The fused LM head's first part: the product into `scratch`, then each block of logits gives
    /// its k best (soft cap applied there) as (index, key) pairs. Returns those and the blocks per row.
    #[allow(clippy::too_many_arguments)]
    fn block_candidates(&self, x: &WgpuBuf, rows: usize, w: &WgpuMat, n: usize, cap: f32, k: usize, scratch: &mut WgpuBuf) -> Result<(Arc<Raw>, usize)> {
        self.matmul(x, rows, w, scratch)?;
        let blocks = n.div_ceil(self.knobs.elem_wg as usize * 4);
        let cand = self.scratch("top_k", rows * blocks * k * 2)?;
        let params = [rows as u32, n as u32, k as u32, cap.to_bits(), blocks as u32];
        self.dispatch("top_k", WDType::F32, &[&scratch.raw, &cand], &params, (blocks as u32, rows as u32, 1))?;
        Ok((cand, blocks))
    }

    /// `embed` of the ids the last `head_top1_chosen` chose (all `rows` given as `CHOSEN_ID`).
    fn embed_chosen(&self, table: &WgpuMat, rows: usize, out: &WgpuBuf) -> Result<()> {
        let d = table.cols;
        check("embed", "out", out.len, rows * d)?;
        let ids = match &self.chosen.lock().unwrap_or_else(|e| e.into_inner()).ids {
            Some(b) if b.len >= rows => b.raw.clone(),
            _ => return Err(Error::Input(format!("embed: {rows} ids stand for the device's choice (CHOSEN_ID), but no step chose that many on the device yet"))),
        };
        for p in &table.parts {
            let params = [rows as u32, d as u32, table.kp as u32, 2, p.row0 as u32, p.rows as u32];
            self.dispatch_binds("embed", table.dtype, &[p.bind(), whole(&ids), whole(&out.raw)], &params, self.grid_stride(rows * d, self.knobs.elem_wg))?;
        }
        Ok(())
    }

    /// Whether the chunkwise kernels take this prefill: 10 storage buffers per stage, and the
    /// per-chunk states (`Cs`) within one binding.
    fn chunkwise_fits(&self, d: MlstmDims, seq: usize, chunk: usize) -> bool {
        let nc = seq.div_ceil(chunk.clamp(1, CHUNK_MAX)) as u64;
        self.limits.max_storage_buffers_per_shader_stage >= 10 && nc * (d.heads * d.dk * d.dv * 4) as u64 <= self.max_binding()
    }

    /// Chunkwise-parallel prefill of `seq` tokens (state batch 1, gates already biased and capped):
    /// the states entering each chunk in one pass over the chunks, then every chunk's outputs in
    /// parallel (`shaders/mlstm_chunk.wgsl`). Chunks are at most `CHUNK_MAX` tokens.
    #[allow(clippy::too_many_arguments)]
    fn mlstm_chunkwise(&self, d: MlstmDims, seq: usize, chunk: usize, q: &WgpuBuf, k: &WgpuBuf, v: &WgpuBuf, i: &WgpuBuf, f: &WgpuBuf, s: &mut MlstmState<WgpuBuf>, eps: f32, h: &mut WgpuBuf) -> Result<()> {
        let nh = d.heads;
        shapes::mlstm("wgpu", "mlstm", d, seq, 1, [q.len, k.len, v.len, i.len, f.len, h.len], [s.c.len, s.n.len, s.m.len], s.c_dtype, &[DType::F32])?;
        if seq == 0 || d.dk == 0 || d.dv == 0 {
            return Ok(());
        }
        let l = chunk.clamp(1, CHUNK_MAX);
        let nc = seq.div_ceil(l);
        let cs = self.scratch("mlstm_chunk_c", nc * nh * d.dk * d.dv)?;
        let ns = self.scratch("mlstm_chunk_n", nc * nh * d.dk)?;
        let ms = self.scratch("mlstm_chunk_m", (nc + 1) * nh)?;
        let params = [nh as u32, d.dk as u32, d.dv as u32, seq as u32, l as u32, eps.to_bits()];
        let (dk, dv) = (d.dk as u32, d.dv as u32);
        self.dispatch("mlstm_chunk_states", WDType::F32, &[&k.raw, &v.raw, &i.raw, &f.raw, &s.c.raw, &s.n.raw, &s.m.raw, &cs, &ns, &ms], &params, (dv.div_ceil(16), dk.div_ceil(16), nh as u32))?;
        self.dispatch("mlstm_chunk_out", WDType::F32, &[&q.raw, &k.raw, &v.raw, &i.raw, &f.raw, &s.m.raw, &cs, &ns, &ms, &h.raw], &params, (dv.div_ceil(64), nc as u32, nh as u32))
    }

    #[allow(clippy::too_many_arguments)]
    fn slstm(&self, op: &str, batch: usize, steps: usize, g: SlstmGates<'_, WgpuBuf>, r: &WgpuBuf, bias: &WgpuBuf, s: &mut SlstmState<WgpuBuf>, y: &mut WgpuBuf) -> Result<()> {
        let (w, nh) = (s.width, s.heads);
        let gates = [g.i.len, g.f.len, g.z.len, g.o.len];
        let dh = shapes::slstm("wgpu", op, batch * steps, batch, w, nh, gates, r.len, bias.len, [s.c.len, s.n.len, s.m.len, s.h.len], y.len)?;
        if dh > 1024 {
            return Err(dev_err(format!("{op}: head width {dh} is over the kernel's limit of 1024")));
        }
        let params = [w as u32, nh as u32, batch as u32, steps as u32];
        self.dispatch(
            "slstm",
            WDType::F32,
            &[&g.i.raw, &g.f.raw, &g.z.raw, &g.o.raw, &r.raw, &bias.raw, &s.c.raw, &s.n.raw, &s.m.raw, &s.h.raw, &y.raw],
            &params,
            ((batch * nh) as u32, 1, 1),
        )
    }

    /// Measures the device's streaming bandwidth with compute kernels over two buffers of up to
    /// 512 MiB: a vec4 copy (bytes read + written per second) and a vec4 read, each workgroup on
    /// blocks of consecutive vec4s as the GEMV reads weights, `XLSTM_WGPU_PROBE_ITERS` blocks per
    /// workgroup (default 4), after a warm-up. (On an H200 through Vulkan a timing of
    /// `copy_buffer_to_buffer` read ~0.4 TB/s; these kernels 3.5–3.7 TB/s copy, 3.8–4.0 TB/s read
    /// with 1–32 blocks per workgroup once the clocks are up.)
    fn measure_bandwidth(&self) -> Result<xlstm_core::bench::Bandwidth> {
        let iters = std::env::var("XLSTM_WGPU_PROBE_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
        self.stream_bandwidth(iters)
    }

    /// The streaming probe of [`Self::measure_bandwidth`] with `iters` blocks per workgroup.
    pub fn stream_bandwidth(&self, iters: u32) -> Result<xlstm_core::bench::Bandwidth> {
        let iters = iters.max(1);
        let len = ((512usize << 20) / 4).min(self.max_binding() as usize / 4) / 4 * 4;
        let src = self.zeros(len)?;
        let dst = self.zeros(len)?;
        let vec4s = (len / 4) as u32;
        let groups = split((vec4s as u64).div_ceil(self.knobs.elem_wg as u64 * 8 * iters as u64));
        let time = |entry: &'static str| -> Result<f64> {
            // Warm-up of at least 0.3 s: the GPU's clocks ramp up under load (on an H200 a probe
            // timed right away read 1.5 / 1.7 TB/s copy / read, and 3.5 / 3.9 after other work).
            let t = std::time::Instant::now();
            while t.elapsed().as_secs_f64() < 0.3 {
                for _ in 0..8 {
                    self.dispatch(entry, WDType::F32, &[&src.raw, &dst.raw], &[vec4s, iters], groups)?;
                }
                self.sync()?;
            }
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                for _ in 0..8 {
                    self.dispatch(entry, WDType::F32, &[&src.raw, &dst.raw], &[vec4s, iters], groups)?;
                }
                self.sync()?;
                best = best.min(t.elapsed().as_secs_f64() / 8.0);
            }
            Ok(best)
        };
        let bytes = (len * 4) as f64;
        let copy = time("stream_copy")?;
        let read = time("stream_read")?;
        Ok(xlstm_core::bench::Bandwidth { copy_gb_s: 2.0 * bytes / copy / 1e9, read_gb_s: bytes / read / 1e9 })
    }
}

/// A workgroup count, spread over y past the 65535 per-dimension limit (kernels guard the excess).
fn split(groups: u64) -> (u32, u32, u32) {
    if groups <= 65535 {
        (groups.max(1) as u32, 1, 1)
    } else {
        (65535, groups.div_ceil(65535) as u32, 1)
    }
}

fn open_pass<'a>(device: &wgpu::Device, rec: &'a mut Rec) -> &'a mut wgpu::ComputePass<'static> {
    if rec.encoder.is_none() {
        rec.encoder = Some(device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("xlstm") }));
    }
    if rec.pass.is_none() {
        let enc = rec.encoder.as_mut().expect("encoder created above");
        rec.pass = Some(enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None }).forget_lifetime());
    }
    rec.pass.as_mut().expect("pass opened above")
}

fn make_buf(device: &wgpu::Device, dead: &Arc<Mutex<Vec<u64>>>, len: usize, data: Option<&[u8]>) -> WgpuBuf {
    // 32-byte padding: the batch-1 GEMV reads x in whole 8-value chunks (past-the-end values masked).
    let size = ((len.max(1) * 4) as u64).next_multiple_of(32);
    let buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: data.is_some(),
    });
    if let Some(d) = data {
        {
            let mut view = buf.get_mapped_range_mut(..).expect("mapped at creation");
            let mut padded = d.to_vec();
            padded.resize(size as usize, 0);
            view.copy_from_slice(&padded);
        }
        buf.unmap();
    }
    WgpuBuf { raw: Arc::new(Raw { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), buf, dead: dead.clone() }), len }
}

impl Backend for WgpuBackend {
    type Buf = WgpuBuf;
    type Mat = WgpuMat;

    fn name(&self) -> String {
        let subgroups = if self.subgroup { ", subgroups" } else { "" };
        let immediates = if self.knobs.immediates { ", immediates" } else { "" };
        format!("wgpu:{} ({}, {:?}{subgroups}{immediates})", self.api.name(), self.info.name, self.info.backend)
    }

    fn zeros(&self, len: usize) -> Result<WgpuBuf> {
        self.new_buf(len, None)
    }
    fn upload(&self, host: &[f32]) -> Result<WgpuBuf> {
        self.new_buf(host.len(), Some(bytemuck::cast_slice(host)))
    }
    fn download(&self, buf: &WgpuBuf, len: usize) -> Result<Vec<f32>> {
        check("download", "buf", buf.len, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let bytes = (len * 4) as u64;
        let mut guard = self.lock();
        let rec = &mut *guard;
        if rec.staging.as_ref().is_none_or(|(_, n)| *n < bytes) {
            let size = bytes.next_power_of_two().max(1 << 16);
            let b = self.device.create_buffer(&wgpu::BufferDescriptor { label: Some("staging"), size, usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false });
            rec.staging = Some((b, size));
        }
        let staging = rec.staging.as_ref().expect("made above").0.clone();
        self.submit_copy(rec, &buf.raw.buf, &staging, bytes);
        rec.idle = true;
        // The lock stays held until the staging buffer is unmapped: no other thread may submit
        // while it is mapped.
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let _ = tx.send(r);
        });
        self.wait(rec)?;
        rx.recv().map_err(|_| dev_err("download: the map callback never ran"))?.map_err(|e| dev_err(format!("download: {e}")))?;
        let out = {
            let view = staging.get_mapped_range(0..bytes).map_err(|e| dev_err(format!("download: {e:?}")))?;
            bytemuck::cast_slice::<u8, f32>(&view).to_vec()
        };
        staging.unmap();
        drop(guard);
        Ok(out)
    }
    fn copy(&self, src: &WgpuBuf, src_off: usize, dst: &mut WgpuBuf, dst_off: usize, len: usize) -> Result<()> {
        check("copy", "src", src.len, src_off + len)?;
        check("copy", "dst", dst.len, dst_off + len)?;
        if len == 0 {
            return Ok(());
        }
        let mut guard = self.lock();
        let rec = &mut *guard;
        rec.pass = None;
        if rec.encoder.is_none() {
            rec.encoder = Some(self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("xlstm") }));
        }
        rec.encoder.as_mut().expect("made above").copy_buffer_to_buffer(&src.raw.buf, (src_off * 4) as u64, &dst.raw.buf, (dst_off * 4) as u64, (len * 4) as u64);
        Ok(())
    }

    fn matrix(&self, w: HostTensor, dtype: DType) -> Result<WgpuMat> {
        if w.shape.len() != 2 {
            return Err(Error::Weights(format!("expected a 2-D weight matrix, got shape {:?}", w.shape)));
        }
        let (rows, cols) = (w.shape[0], w.shape[1]);
        let kp = cols.next_multiple_of(8).max(8);
        let t = w.to_dtype(dtype);
        let (wd, row_words) = match &t.data {
            HostData::F32(_) => (WDType::F32, kp),
            HostData::BF16(_) => (WDType::BF16, kp / 2),
            HostData::F16(_) => (WDType::F16, kp / 2),
        };
        let row_bytes = (row_words * 4) as u64;
        let per_part = ((self.part_limit / row_bytes) as usize).max(1);
        let mut parts = Vec::new();
        for row0 in (0..rows.max(1)).step_by(per_part) {
            let n = per_part.min(rows - row0.min(rows));
            let mut words = vec![0u32; n.max(1) * row_words];
            for r in 0..n {
                let dst = &mut words[r * row_words..(r + 1) * row_words];
                let src_row = row0 + r;
                match &t.data {
                    HostData::F32(v) => {
                        for (c, x) in v[src_row * cols..(src_row + 1) * cols].iter().enumerate() {
                            dst[c] = x.to_bits();
                        }
                    }
                    HostData::BF16(v) => {
                        for (c, x) in v[src_row * cols..(src_row + 1) * cols].iter().enumerate() {
                            dst[c / 2] |= (x.to_bits() as u32) << (16 * (c % 2));
                        }
                    }
                    HostData::F16(v) => {
                        for (c, x) in v[src_row * cols..(src_row + 1) * cols].iter().enumerate() {
                            dst[c / 2] |= (x.to_bits() as u32) << (16 * (c % 2));
                        }
                    }
                }
            }
            let (raw, off) = self.place(&words)?;
            parts.push(MatPart { raw, off, bytes: (words.len() * 4) as u64, row0, rows: n });
            if rows == 0 {
                break;
            }
        }
        // Let the upload staging memory go every ~512 MiB rather than holding all of it to the first submit.
        if self.unflushed.load(Ordering::Relaxed) > (512 << 20) {
            self.unflushed.store(0, Ordering::Relaxed);
            self.queue.submit([]);
            let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
        }
        Ok(WgpuMat { parts, rows, cols, kp, dtype: wd })
    }
    fn expect_matrix_bytes(&self, bytes: usize) {
        self.expected.store(bytes as u64, Ordering::Relaxed);
    }
    fn matrix_bytes(&self, w: &WgpuMat) -> usize {
        let size = match w.dtype {
            WDType::F32 => 4,
            _ => 2,
        };
        w.rows * w.cols * size
    }
    fn prefill_segment(&self) -> usize {
        // GPUs: 2,048 rows give the GEMM full waves (7B prompt of 2,048 tokens on an H200 through
        // Vulkan: 1.72 s in one segment, 1.91 s in segments of 512), for ~0.8 GB of activations
        // and chunk states. CPU adapters (lavapipe): the default 512.
        if self.info.device_type == wgpu::DeviceType::Cpu {
            512
        } else {
            2048
        }
    }
    fn release_cache(&self) -> Result<()> {
        let mut rec = self.lock();
        self.flush(&mut rec);
        rec.groups.clear();
        rec.scratch.clear();
        rec.staging = None;
        Ok(())
    }

    fn embed(&self, table: &WgpuMat, ids: &[u32], out: &mut WgpuBuf) -> Result<()> {
        let d = table.cols;
        check("embed", "out", out.len, ids.len() * d)?;
        if ids.contains(&CHOSEN_ID) {
            return self.embed_chosen(table, ids.len(), out);
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(Error::Input(format!("token id {bad} is out of range: the vocabulary has {} tokens", table.rows)));
        }
        for p in &table.parts {
            let local: Vec<u32> = ids.iter().map(|&id| {
                let id = id as usize;
                if id >= p.row0 && id < p.row0 + p.rows { (id - p.row0) as u32 } else { u32::MAX }
            }).collect();
            if local.iter().all(|&v| v == u32::MAX) {
                continue;
            }
            // Few ids (decode) travel in the parameter words: no buffer per step.
            let inline = local.len() <= EMBED_INLINE_IDS;
            let mut params = vec![ids.len() as u32, d as u32, table.kp as u32, inline as u32];
            let idb = if inline {
                params.extend_from_slice(&local);
                self.dummy.raw.clone()
            } else {
                self.new_buf(local.len(), Some(bytemuck::cast_slice(&local)))?.raw
            };
            self.dispatch_binds("embed", table.dtype, &[p.bind(), whole(&idb), whole(&out.raw)], &params, self.grid_stride(ids.len() * d, self.knobs.elem_wg))?;
        }
        Ok(())
    }

    fn matmul(&self, x: &WgpuBuf, rows: usize, w: &WgpuMat, out: &mut WgpuBuf) -> Result<()> {
        self.mm(x, rows, w, out, false)
    }

    fn matmul_add(&self, x: &WgpuBuf, rows: usize, w: &WgpuMat, out: usize, _tmp: &mut WgpuBuf, acc: &mut WgpuBuf) -> Result<()> {
        if out != w.rows {
            return Err(dev_err(format!("matmul_add: `out` {out} differs from the matrix's {} rows", w.rows)));
        }
        self.mm(x, rows, w, acc, true)
    }

    fn rms_norm(&self, x: &WgpuBuf, rows: usize, width: usize, weight: &WgpuBuf, eps: f32, out: &mut WgpuBuf) -> Result<()> {
        check("rms_norm", "x", x.len, rows * width)?;
        check("rms_norm", "out", out.len, rows * width)?;
        check("rms_norm", "weight", weight.len, width)?;
        let params = [rows as u32, width as u32, eps.to_bits()];
        self.dispatch("rms_norm", WDType::F32, &[&x.raw, &weight.raw, &out.raw], &params, split(rows as u64))
    }

    fn group_norm(&self, x: &WgpuBuf, rows: usize, width: usize, group: usize, weight: &WgpuBuf, bias: Option<&WgpuBuf>, eps: f32, out: &mut WgpuBuf) -> Result<()> {
        self.group_norm_gated(x, rows, width, group, weight, bias, None, eps, out)
    }

    fn bias_soft_cap(&self, x: &mut WgpuBuf, rows: usize, width: usize, bias: Option<&WgpuBuf>, cap: f32) -> Result<()> {
        check("bias_soft_cap", "x", x.len, rows * width)?;
        if let Some(b) = bias {
            check("bias_soft_cap", "bias", b.len, width)?;
        }
        let params = [rows as u32, width as u32, bias.is_some() as u32, cap.to_bits()];
        let b = bias.map_or(&self.dummy.raw, |b| &b.raw);
        self.dispatch("bias_soft_cap", WDType::F32, &[&x.raw, b], &params, self.grid_stride(rows * width, self.knobs.elem_wg))
    }

    fn add(&self, x: &mut WgpuBuf, y: &WgpuBuf, len: usize) -> Result<()> {
        check("add", "x", x.len, len)?;
        check("add", "y", y.len, len)?;
        self.dispatch("add", WDType::F32, &[&x.raw, &y.raw], &[len as u32], self.grid_stride(len, self.knobs.elem_wg))
    }

    fn swiglu(&self, gate: &WgpuBuf, up: &WgpuBuf, len: usize, out: &mut WgpuBuf) -> Result<()> {
        self.gated_act(Activation::Silu, gate, up, len, out)
    }

    fn sigmoid_gate(&self, gate: &WgpuBuf, x: &mut WgpuBuf, len: usize) -> Result<()> {
        check("sigmoid_gate", "gate", gate.len, len)?;
        check("sigmoid_gate", "x", x.len, len)?;
        self.dispatch("sigmoid_gate", WDType::F32, &[&gate.raw, &x.raw], &[len as u32], self.grid_stride(len, self.knobs.elem_wg))
    }

    fn gated_act(&self, act: Activation, gate: &WgpuBuf, up: &WgpuBuf, len: usize, out: &mut WgpuBuf) -> Result<()> {
        check("gated_act", "gate", gate.len, len)?;
        check("gated_act", "up", up.len, len)?;
        check("gated_act", "out", out.len, len)?;
        let code = act.code();
        self.dispatch("gated_act", WDType::F32, &[&gate.raw, &up.raw, &out.raw], &[len as u32, code], self.grid_stride(len, self.knobs.elem_wg))
    }

    fn scaled_add(&self, x: &mut WgpuBuf, y: &WgpuBuf, scale: &WgpuBuf, rows: usize, width: usize) -> Result<()> {
        check("scaled_add", "x", x.len, rows * width)?;
        check("scaled_add", "y", y.len, rows * width)?;
        check("scaled_add", "scale", scale.len, width)?;
        self.dispatch("scaled_add", WDType::F32, &[&x.raw, &y.raw, &scale.raw], &[rows as u32, width as u32], self.grid_stride(rows * width, self.knobs.elem_wg))
    }

    fn copy_cols(&self, src: &WgpuBuf, src_stride: usize, src_off: usize, dst: &mut WgpuBuf, dst_stride: usize, dst_off: usize, rows: usize, width: usize) -> Result<()> {
        if rows == 0 || width == 0 {
            return Ok(());
        }
        if src_off + width > src_stride || dst_off + width > dst_stride {
            return Err(dev_err(format!("copy_cols: columns {src_off}+{width} / {dst_off}+{width} overrun row strides {src_stride} / {dst_stride}")));
        }
        check("copy_cols", "src", src.len, (rows - 1) * src_stride + src_off + width)?;
        check("copy_cols", "dst", dst.len, (rows - 1) * dst_stride + dst_off + width)?;
        let params = [src_stride as u32, src_off as u32, dst_stride as u32, dst_off as u32, rows as u32, width as u32];
        self.dispatch("copy_cols", WDType::F32, &[&src.raw, &dst.raw], &params, self.grid_stride(rows * width, self.knobs.elem_wg))
    }

    fn headwise(&self, x: &WgpuBuf, rows: usize, w: &WgpuBuf, d: HeadwiseDims, bias: Option<&WgpuBuf>, out: &mut WgpuBuf) -> Result<()> {
        check("headwise", "x", x.len, rows * d.blocks * d.din)?;
        check("headwise", "w", w.len, d.blocks * d.dout * d.din)?;
        check("headwise", "out", out.len, rows * d.blocks * d.dout)?;
        if let Some(b) = bias {
            check("headwise", "bias", b.len, d.blocks * d.dout)?;
        }
        let params = [rows as u32, d.blocks as u32, d.din as u32, d.dout as u32, bias.is_some() as u32];
        let b = bias.map_or(&self.dummy.raw, |b| &b.raw);
        self.dispatch("headwise", WDType::F32, &[&x.raw, &w.raw, b, &out.raw], &params, self.grid_stride(rows * d.blocks * d.dout, self.knobs.elem_wg))
    }

    fn conv1d_prefill(&self, d: ConvDims, seq: usize, x: &WgpuBuf, w: &WgpuBuf, bias: &WgpuBuf, state: &mut WgpuBuf, silu: bool, out: &mut WgpuBuf) -> Result<()> {
        self.conv_full("conv1d_prefill", d, seq, false, x, w, bias, state, silu, out)
    }

    fn conv1d_step(&self, d: ConvDims, batch: usize, x: &WgpuBuf, w: &WgpuBuf, bias: &WgpuBuf, state: &mut WgpuBuf, silu: bool, out: &mut WgpuBuf) -> Result<()> {
        self.conv_full("conv1d_step", d, batch, true, x, w, bias, state, silu, out)
    }

    fn mlstm_step(&self, d: MlstmDims, batch: usize, q: &WgpuBuf, k: &WgpuBuf, v: &WgpuBuf, i: &WgpuBuf, f: &WgpuBuf, s: &mut MlstmState<WgpuBuf>, eps: f32, h: &mut WgpuBuf) -> Result<()> {
        self.mlstm_steps(d, batch, batch, q, k, v, i, f, None, s, eps, h)
    }

    fn mlstm_prefill(&self, kernel: MlstmKernel, d: MlstmDims, seq: usize, q: &WgpuBuf, k: &WgpuBuf, v: &WgpuBuf, i: &WgpuBuf, f: &WgpuBuf, s: &mut MlstmState<WgpuBuf>, eps: f32, h: &mut WgpuBuf) -> Result<()> {
        if let MlstmKernel::Chunkwise { chunk: 0 } = kernel {
            return Err(Error::Input("chunk size must be positive".into()));
        }
        match kernel {
            MlstmKernel::Chunkwise { chunk } if self.chunkwise_fits(d, seq, chunk) => self.mlstm_chunkwise(d, seq, chunk, q, k, v, i, f, s, eps, h),
            // The recurrent form token by token (two dispatches per token, all in one submission):
            // every split of a segment gives the same result (NOTES §2).
            _ => self.mlstm_steps(d, 1, seq, q, k, v, i, f, None, s, eps, h),
        }
    }

    fn slstm_step(&self, batch: usize, g: SlstmGates<'_, WgpuBuf>, r: &WgpuBuf, bias: &WgpuBuf, s: &mut SlstmState<WgpuBuf>, y: &mut WgpuBuf) -> Result<()> {
        self.slstm("slstm_step", batch, 1, g, r, bias, s, y)
    }

    fn slstm_prefill(&self, seq: usize, g: SlstmGates<'_, WgpuBuf>, r: &WgpuBuf, bias: &WgpuBuf, s: &mut SlstmState<WgpuBuf>, y: &mut WgpuBuf) -> Result<()> {
        self.slstm("slstm_prefill", 1, seq, g, r, bias, s, y)
    }

    fn mlstm_gated_cell(&self, kernel: Option<MlstmKernel>, dims: MlstmDims, rows: usize, q: &WgpuBuf, k: &WgpuBuf, v: &WgpuBuf, o: &WgpuBuf, i: &mut WgpuBuf, f: &mut WgpuBuf, ibias: &WgpuBuf, fbias: &WgpuBuf, cap: f32, state: &mut MlstmState<WgpuBuf>, eps: f32, norm: &WgpuBuf, norm_eps: f32, h: &mut WgpuBuf, hn: &mut WgpuBuf) -> Result<()> {
        // Bias + soft cap fused into the gate kernel (the chunkwise prefill: applied first, in
        // place), σ(o) fused into the per-head norm.
        if let Some(MlstmKernel::Chunkwise { chunk: 0 }) = kernel {
            return Err(Error::Input("chunk size must be positive".into()));
        }
        let batch = if kernel.is_some() { 1 } else { rows };
        if kernel.is_none() && self.fused_cell {
            return self.mlstm_decode_gated(dims, rows, q, k, v, o, i, f, ibias, fbias, cap, state, eps, norm, norm_eps, h, hn);
        }
        match kernel {
            Some(MlstmKernel::Chunkwise { chunk }) if self.chunkwise_fits(dims, rows, chunk) => {
                self.bias_soft_cap(i, rows, dims.heads, Some(ibias), cap)?;
                self.bias_soft_cap(f, rows, dims.heads, Some(fbias), cap)?;
                self.mlstm_chunkwise(dims, rows, chunk, q, k, v, i, f, state, eps, h)?;
            }
            _ => self.mlstm_steps(dims, batch, rows, q, k, v, i, f, Some((ibias, fbias, cap)), state, eps, h)?,
        }
        let width = dims.heads * dims.dv;
        self.group_norm_gated(h, rows, width, dims.dv, norm, None, Some(o), norm_eps, hn)
    }

    fn norm_matmuls(&self, x: &WgpuBuf, rows: usize, width: usize, weight: &WgpuBuf, eps: f32, xn: &mut WgpuBuf, mats: &[&WgpuMat], outs: &mut [&mut WgpuBuf]) -> Result<()> {
        let d16 = Self::mv_dtype(mats.iter().copied());
        if rows != 1 || !self.fused || d16.is_none() || mats.len() != outs.len() || mats.iter().any(|m| m.cols != width) {
            self.rms_norm(x, rows, width, weight, eps, xn)?;
            for (w, out) in mats.iter().zip(outs.iter_mut()) {
                self.matmul(xn, rows, w, out)?;
            }
            return Ok(());
        }
        for (m, o) in mats.iter().zip(outs.iter()) {
            check("norm_matmuls", "out", o.len, m.rows)?;
        }
        let mut slots: Vec<Slot<'_>> = mats
            .iter()
            .zip(outs.iter())
            .flat_map(|(m, o)| m.parts.iter().map(move |part| Slot { part, wide: m.dtype == WDType::F32, out: &o.raw }))
            .collect();
        // f32 slots first: their few workgroups (the gate rows) read 16-byte words one chunk per
        // step, so they start first rather than trail the dispatch.
        slots.sort_by_key(|s| !s.wide);
        self.mv("mv_norm", x, width, &slots, Some((weight, eps)), Some(xn), false, None, 0, d16.expect("checked above"))
    }

    fn norm_gated_up(&self, x: &WgpuBuf, rows: usize, width: usize, weight: &WgpuBuf, eps: f32, xn: &mut WgpuBuf, gate: &WgpuMat, up: &WgpuMat, ff: usize, act: Activation, g: &mut WgpuBuf, u: &mut WgpuBuf, out: &mut WgpuBuf) -> Result<()> {
        let d16 = Self::mv_dtype([gate, up].into_iter());
        let aligned = gate.parts.len() == up.parts.len() && gate.parts.iter().zip(&up.parts).all(|(a, b)| a.row0 == b.row0 && a.rows == b.rows);
        if rows != 1 || !self.fused || d16.is_none() || !aligned || gate.dtype != up.dtype || gate.cols != width || up.cols != width || gate.rows != ff || up.rows != ff {
            self.rms_norm(x, rows, width, weight, eps, xn)?;
            self.matmul(xn, rows, gate, g)?;
            self.matmul(xn, rows, up, u)?;
            return self.gated_act(act, g, u, rows * ff, out);
        }
        check("norm_gated_up", "out", out.len, ff)?;
        let slots: Vec<Slot<'_>> = gate.parts.iter().map(|part| Slot { part, wide: gate.dtype == WDType::F32, out: &out.raw }).collect();
        let ups: Vec<&MatPart> = up.parts.iter().collect();
        self.mv("mv_pair", x, width, &slots, Some((weight, eps)), Some(xn), false, Some(&ups), act.code(), d16.expect("checked above"))
    }

    fn device_bandwidth(&self) -> Result<Option<xlstm_core::bench::Bandwidth>> {
        self.measure_bandwidth().map(Some)
    }

    fn head_top_k(&self, x: &WgpuBuf, rows: usize, w: &WgpuMat, n: usize, cap: f32, k: usize, scratch: &mut WgpuBuf) -> Result<Vec<Vec<(u32, f32)>>> {
        if k == 0 || k > TOP_K_MAX || n != w.rows || n == 0 {
            return xlstm_core::backend::head_top_k_on_host(self, x, rows, w, n, cap, k, scratch);
        }
        // Only the blocks' candidates come back to the host, which merges them.
        let (cand, blocks) = self.block_candidates(x, rows, w, n, cap, k, scratch)?;
        let host = self.download(&WgpuBuf { raw: cand, len: rows * blocks * k * 2 }, rows * blocks * k * 2)?;
        let words: Vec<u32> = host.iter().map(|v| v.to_bits()).collect();
        let mut out = Vec::with_capacity(rows);
        for row in words.chunks(blocks * k * 2) {
            let mut all: Vec<(u32, f32)> = Vec::with_capacity(blocks * k);
            for block in row.chunks(k * 2) {
                for pair in block.chunks(2) {
                    if pair[0] == u32::MAX {
                        break;
                    }
                    all.push((pair[0], f32::from_bits(from_order_key(pair[1]))));
                }
            }
            all.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            all.truncate(k);
            out.push(all);
        }
        Ok(out)
    }

    fn device_greedy(&self) -> bool {
        true
    }

    fn head_top1_chosen(&self, x: &WgpuBuf, rows: usize, w: &WgpuMat, n: usize, cap: f32, scratch: &mut WgpuBuf) -> Result<u64> {
        if n != w.rows || n == 0 || rows == 0 {
            return Err(dev_err(format!("head_top1_chosen: {rows} rows of {n} logits from a {}-row head", w.rows)));
        }
        // Each block's best, then one workgroup per row merges them.
        let (cand, blocks) = self.block_candidates(x, rows, w, n, cap, 1, scratch)?;
        let params = [rows as u32, n as u32, 1, cap.to_bits(), blocks as u32];
        let ids = {
            let mut ch = self.chosen.lock().unwrap_or_else(|e| e.into_inner());
            if ch.ids.as_ref().is_none_or(|b| b.len < rows) {
                ch.ids = Some(self.new_buf(rows, None)?);
            }
            ch.ids.as_ref().expect("made above").raw.clone()
        };
        self.dispatch("top1_merge", WDType::F32, &[&cand, &ids], &params, (1, rows as u32, 1))?;
        // Copy the ids back through a free read-back buffer and submit; nothing waits here.
        let mut ch = self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = (rows * 4) as u64;
        let slot = match ch.readbacks.iter().position(|(b, t)| t.is_none() && b.size() >= bytes) {
            Some(i) => i,
            None => {
                let b = self.device.create_buffer(&wgpu::BufferDescriptor { label: Some("chosen ids"), size: bytes.max(256), usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false });
                ch.readbacks.push((b, None));
                ch.readbacks.len() - 1
            }
        };
        let submission = {
            let mut guard = self.lock();
            let rec = &mut *guard;
            self.submit_copy(rec, &ids.buf, &ch.readbacks[slot].0, bytes);
            rec.last_submission.clone().expect("flush submitted")
        };
        ch.next_ticket += 1;
        let id = ch.next_ticket;
        ch.readbacks[slot].1 = Some(Ticket { id, rows, submission });
        Ok(id)
    }

    fn chosen_ids(&self, ticket: u64) -> Result<Vec<u32>> {
        let mut ch = self.chosen.lock().unwrap_or_else(|e| e.into_inner());
        let slot = ch.readbacks.iter().position(|(_, t)| t.as_ref().is_some_and(|t| t.id == ticket)).ok_or_else(|| Error::Input(format!("chosen_ids: no ticket {ticket} in flight (each is read once)")))?;
        let (buf, t) = &mut ch.readbacks[slot];
        let t = t.take().expect("found above");
        let bytes = (t.rows * 4) as u64;
        let (tx, rx) = std::sync::mpsc::channel();
        buf.map_async(wgpu::MapMode::Read, 0..bytes, move |r| {
            let _ = tx.send(r);
        });
        // Waits for that submission only: later steps may already be running.
        let t0 = std::time::Instant::now();
        self.device.poll(wgpu::PollType::Wait { submission_index: Some(t.submission), timeout: None }).map_err(|e| dev_err(format!("poll: {e}")))?;
        self.lock().host.wait += t0.elapsed();
        rx.recv().map_err(|_| dev_err("chosen_ids: the map callback never ran"))?.map_err(|e| dev_err(format!("chosen_ids: {e}")))?;
        let ids = {
            let view = buf.get_mapped_range(0..bytes).map_err(|e| dev_err(format!("chosen_ids: {e:?}")))?;
            bytemuck::cast_slice::<u8, u32>(&view).to_vec()
        };
        buf.unmap();
        Ok(ids)
    }
}

/// Largest k the device selection takes (more: the logits come back and the host selects). On an
/// H200 each round of the selection costs ~3 µs: xLSTM-7B's head with k = 1 took 184 µs against
/// 220 µs for reading all logits back, k = 50 336 µs; past k ≈ 12 the read-back is faster.
const TOP_K_MAX: usize = 8;

/// The inverse of topk.wgsl's `order_key`: a key back to the f32 bits it was made from.
fn from_order_key(key: u32) -> u32 {
    if key & 0x8000_0000 != 0 {
        key & 0x7fff_ffff
    } else {
        !key
    }
}

impl WgpuBackend {
    #[allow(clippy::too_many_arguments)]
    fn group_norm_gated(&self, x: &WgpuBuf, rows: usize, width: usize, group: usize, weight: &WgpuBuf, bias: Option<&WgpuBuf>, gate: Option<&WgpuBuf>, eps: f32, out: &mut WgpuBuf) -> Result<()> {
        check("group_norm", "x", x.len, rows * width)?;
        check("group_norm", "out", out.len, rows * width)?;
        check("group_norm", "weight", weight.len, width)?;
        if group == 0 || !width.is_multiple_of(group) {
            return Err(dev_err(format!("group_norm: width {width} is not a multiple of group {group}")));
        }
        if let Some(b) = bias {
            check("group_norm", "bias", b.len, width)?;
        }
        if let Some(g) = gate {
            check("group_norm", "gate", g.len, rows * width)?;
        }
        let params = [rows as u32, width as u32, group as u32, eps.to_bits(), bias.is_some() as u32, gate.is_some() as u32];
        let b = bias.map_or(&self.dummy.raw, |b| &b.raw);
        let g = gate.map_or(&self.dummy.raw, |g| &g.raw);
        self.dispatch("group_norm", WDType::F32, &[&x.raw, &weight.raw, b, g, &out.raw], &params, split((rows * (width / group)) as u64))
    }

    /// The gated decode mLSTM step (one token per sequence): gates + cell + h, then the state
    /// commit + σ(o)·head norm, in one dispatch (`mlstm_step_normed`: each unit's last workgroup
    /// does the second part; xLSTM-7B on an H200, mean of three runs: 5.25 against 5.31 ms per
    /// token) or in two (`mlstm_cell_fused`, `mlstm_norm`).
    #[allow(clippy::too_many_arguments)]
    fn mlstm_decode_gated(&self, d: MlstmDims, batch: usize, q: &WgpuBuf, k: &WgpuBuf, v: &WgpuBuf, o: &WgpuBuf, i: &WgpuBuf, f: &WgpuBuf, ibias: &WgpuBuf, fbias: &WgpuBuf, cap: f32, s: &mut MlstmState<WgpuBuf>, eps: f32, norm: &WgpuBuf, norm_eps: f32, h: &mut WgpuBuf, hn: &mut WgpuBuf) -> Result<()> {
        let op = "mlstm";
        let nh = d.heads;
        let width = nh * d.dv;
        shapes::mlstm("wgpu", op, d, batch, batch, [q.len, k.len, v.len, i.len, f.len, h.len], [s.c.len, s.n.len, s.m.len], s.c_dtype, &[DType::F32])?;
        check(op, "o", o.len, batch * width)?;
        check(op, "ibias", ibias.len, nh)?;
        check(op, "fbias", fbias.len, nh)?;
        check(op, "hn", hn.len, batch * width)?;
        check(op, "norm", norm.len, width)?;
        let units = batch * nh;
        if units == 0 || d.dv == 0 {
            return Ok(());
        }
        let scal = self.scratch("mlstm_scal", units * 4)?;
        let params = [nh as u32, d.dk as u32, d.dv as u32, units as u32, eps.to_bits(), 0, 1, cap.to_bits(), norm_eps.to_bits()];
        let groups = ((d.dv as u32).div_ceil(self.knobs.cell_cols), units as u32, 1);
        if self.normed_cell {
            // The per-unit counts start at zero (new buffers are zeroed) and the last workgroup of
            // each unit puts its count back to zero.
            let counters = self.scratch("mlstm_counters", units)?;
            let bufs = [&q.raw, &k.raw, &i.raw, &f.raw, &ibias.raw, &fbias.raw, &s.n.raw, &s.m.raw, &scal, &v.raw, &s.c.raw, &h.raw, &norm.raw, &o.raw, &hn.raw, &counters];
            return self.dispatch("mlstm_step_normed", WDType::F32, &bufs, &params, groups);
        }
        self.dispatch("mlstm_cell_fused", WDType::F32, &[&q.raw, &k.raw, &i.raw, &f.raw, &ibias.raw, &fbias.raw, &s.n.raw, &s.m.raw, &scal, &v.raw, &s.c.raw, &h.raw], &params, groups)?;
        let params = [nh as u32, d.dk as u32, d.dv as u32, units as u32, norm_eps.to_bits()];
        self.dispatch("mlstm_norm", WDType::F32, &[&k.raw, &s.n.raw, &s.m.raw, &scal, &h.raw, &norm.raw, &o.raw, &hn.raw], &params, split(units as u64))
    }

    #[allow(clippy::too_many_arguments)]
    fn conv_full(&self, op: &str, d: ConvDims, rows: usize, per_row: bool, x: &WgpuBuf, w: &WgpuBuf, bias: &WgpuBuf, state: &mut WgpuBuf, silu: bool, out: &mut WgpuBuf) -> Result<()> {
        let ch = d.channels;
        let seqs = if per_row { rows } else { 1 };
        shapes::conv("wgpu", op, d, rows, seqs, [x.len, w.len, bias.len, state.len, out.len])?;
        if rows == 0 {
            return Ok(());
        }
        let params = [rows as u32, ch as u32, d.kernel as u32, per_row as u32, silu as u32];
        let wg = self.knobs.elem_wg;
        let st = if d.taps() == 0 { &self.dummy.raw } else { &state.raw };
        self.dispatch("conv_out", WDType::F32, &[&x.raw, &w.raw, &bias.raw, st, &out.raw], &params, self.grid_stride(rows * ch, wg))?;
        if d.taps() > 0 {
            self.dispatch("conv_state", WDType::F32, &[&x.raw, &state.raw], &params, self.grid_stride(seqs * ch, wg))?;
        }
        Ok(())
    }
}
