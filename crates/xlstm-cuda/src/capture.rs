//! Decode-step capture into CUDA graphs, invisible to model code.
//!
//! `Model::step` brackets each step with `Backend::step_begin` / `step_end` and runs the step again
//! while `step_end` says so (at most three attempts). Every op passes through [`Capture::enter`] with
//! a signature (op, device pointers, sizes, scalars):
//!
//! - **Eager**: ops run as usual. A completed step makes the backend *warm*.
//! - **Record** (the step after a warm one, or the retry of a step no graph fits): the stream is
//!   captured; ops are recorded, not run, and their signatures kept. At the first host read-back
//!   (`download`: the step's logits) or at `step_end` the capture ends and the graph is instantiated
//!   and launched — so the step runs exactly once.
//! - **Replay** (when graphs exist): ops are not run; each signature is matched against the cached
//!   graphs (up to four, e.g. one per state or batch size in use) and the graph whose whole sequence
//!   matches is launched at the read-back. Token ids go through a pinned host buffer that the graph's
//!   first copy reads, so new ids reach the replay.
//!
//! A signature no graph has (other buffers, batch, state) or an op that cannot be recorded (an
//! allocation, a scratch that must grow) *breaks* the step: that op returns an error before doing
//! anything, nothing of the step has run, and `step_end` asks for the step again — recorded after a
//! replay no graph fits, eager after a failed recording or a replay that met an unrecordable op.
//! Three failed recordings in a row switch capture off. `XLSTM_CUDA_GRAPHS=0` switches it off from
//! the start.
use cudarc::driver::sys::{self, CUgraph, CUgraphExec, CUstream};
use xlstm_core::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Eager,
    Record,
    Replay,
}

struct Graph {
    exec: CUgraphExec,
    graph: CUgraph,
    sigs: Vec<u64>,
    used: u64,
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: created by instantiate / end-capture below and destroyed once; launches are always
        // followed by a read-back or a synchronisation before the graph can be dropped.
        unsafe {
            sys::cuGraphExecDestroy(self.exec);
            sys::cuGraphDestroy(self.graph);
        }
    }
}

const MAX_GRAPHS: usize = 4;

pub(crate) struct Capture {
    enabled: bool,
    in_step: bool,
    mode: Mode,
    graphs: Vec<Graph>,
    /// Replay: indices of the graphs that still match; Record: the signatures so far.
    candidates: Vec<usize>,
    sigs: Vec<u64>,
    pos: usize,
    flushed: bool,
    broken: bool,
    /// The step broke on an op that cannot be recorded (an allocation, a scratch that must grow).
    setup: bool,
    capturing: bool,
    warm: bool,
    next: Option<Mode>,
    record_failures: u32,
    clock: u64,
    /// Steps replayed from a graph, steps recorded, steps run eagerly (for tests and reports).
    pub replays: u64,
    pub records: u64,
    pub eager: u64,
}

fn broken_err() -> Error {
    Error::Device("cuda: the recorded decode step does not fit this step; it runs again".into())
}

/// Hashes an op signature.
pub(crate) fn sig(words: &[u64]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &w in words {
        h ^= w;
        h = h.wrapping_mul(0x100_0000_01b3).rotate_left(17);
    }
    h
}

impl Capture {
    pub fn new() -> Self {
        let enabled = std::env::var("XLSTM_CUDA_GRAPHS").map_or(true, |v| v != "0");
        Capture {
            enabled,
            in_step: false,
            mode: Mode::Eager,
            graphs: Vec::new(),
            candidates: Vec::new(),
            sigs: Vec::new(),
            pos: 0,
            flushed: false,
            broken: false,
            setup: false,
            capturing: false,
            warm: false,
            next: None,
            record_failures: 0,
            clock: 0,
            replays: 0,
            records: 0,
            eager: 0,
        }
    }

    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        self.record_failures = 0;
        self.next = None;
        if !on {
            self.graphs.clear();
        }
    }

    pub fn clear(&mut self) {
        self.graphs.clear();
    }

    /// The mode ops run in now (Eager outside a step and after the step's graph ran).
    pub fn mode(&self) -> Mode {
        if self.in_step && !self.flushed {
            self.mode
        } else {
            Mode::Eager
        }
    }

    /// Whether a decode step is running (between `step_begin` and `step_end`).
    pub fn in_step(&self) -> bool {
        self.in_step
    }

    pub fn step_begin(&mut self, stream: CUstream) -> Result<()> {
        if self.in_step {
            // A step that never ended (an error escaped between the hooks): drop its capture.
            self.abort(stream);
        }
        self.in_step = true;
        self.flushed = false;
        self.broken = false;
        self.setup = false;
        self.pos = 0;
        let usable = self.enabled && self.record_failures < 3;
        self.mode = match self.next.take() {
            Some(m) if usable || m == Mode::Eager => m,
            _ if !usable => Mode::Eager,
            _ if !self.graphs.is_empty() => Mode::Replay,
            _ if self.warm => Mode::Record,
            _ => Mode::Eager,
        };
        match self.mode {
            Mode::Record => {
                self.sigs.clear();
                // SAFETY: valid stream, not capturing.
                let r = unsafe { sys::cuStreamBeginCapture_v2(stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) };
                if r != sys::CUresult::CUDA_SUCCESS {
                    self.mode = Mode::Eager;
                    self.record_failures += 1;
                } else {
                    self.capturing = true;
                }
            }
            Mode::Replay => self.candidates = (0..self.graphs.len()).collect(),
            Mode::Eager => {}
        }
        Ok(())
    }

    /// Whether the op with signature `s` should run now (false: a replay covers it).
    pub fn enter(&mut self, s: u64) -> Result<bool> {
        if !self.in_step || self.flushed {
            return Ok(true);
        }
        if self.broken {
            return Err(broken_err());
        }
        match self.mode {
            Mode::Eager => Ok(true),
            Mode::Record => {
                self.sigs.push(s);
                Ok(true)
            }
            Mode::Replay => {
                let (graphs, pos) = (&self.graphs, self.pos);
                self.candidates.retain(|&g| graphs[g].sigs.get(pos) == Some(&s));
                if self.candidates.is_empty() {
                    self.broken = true;
                    return Err(broken_err());
                }
                self.pos += 1;
                Ok(false)
            }
        }
    }

    /// An op that cannot be recorded (allocation, scratch growth) is about to run: in Record or
    /// Replay mode this breaks the step (Err); otherwise Ok.
    pub fn unrecordable(&mut self) -> Result<()> {
        match self.mode() {
            Mode::Eager => Ok(()),
            _ => {
                self.broken = true;
                self.setup = true;
                Err(broken_err())
            }
        }
    }

    /// Internal scratch moved: recorded graphs may point at the old memory.
    pub fn scratch_moved(&mut self) -> Result<()> {
        self.unrecordable()?;
        self.graphs.clear();
        Ok(())
    }

    /// An op failed: in a recorded or replayed step, the step is broken.
    pub fn fail(&mut self) {
        if self.in_step && !self.flushed && self.mode != Mode::Eager {
            self.broken = true;
        }
    }

    fn abort(&mut self, stream: CUstream) {
        if self.capturing {
            let mut g: CUgraph = std::ptr::null_mut();
            // SAFETY: ends the capture begun in step_begin; a returned graph is destroyed.
            unsafe {
                sys::cuStreamEndCapture(stream, &mut g);
                if !g.is_null() {
                    sys::cuGraphDestroy(g);
                }
            }
            self.capturing = false;
        }
    }

    /// Runs the step's recorded work now (before a host read-back): ends a recording (instantiate +
    /// launch) or launches the matching replay.
    pub fn flush(&mut self, stream: CUstream) -> Result<()> {
        if !self.in_step || self.flushed || self.mode == Mode::Eager {
            return Ok(());
        }
        if self.broken {
            return Err(broken_err());
        }
        self.clock += 1;
        let idx = match self.mode {
            Mode::Record => {
                let mut g: CUgraph = std::ptr::null_mut();
                self.capturing = false;
                // SAFETY: ends our capture; on success the graph is instantiated and owned by Graph.
                let r = unsafe { sys::cuStreamEndCapture(stream, &mut g) };
                if r != sys::CUresult::CUDA_SUCCESS || g.is_null() {
                    self.broken = true;
                    return Err(Error::Device(format!("cuda: ending the decode-step capture failed ({r:?})")));
                }
                let mut exec: CUgraphExec = std::ptr::null_mut();
                let r = unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, g, 0) };
                if r != sys::CUresult::CUDA_SUCCESS {
                    unsafe { sys::cuGraphDestroy(g) };
                    self.broken = true;
                    return Err(Error::Device(format!("cuda: instantiating the decode graph failed ({r:?})")));
                }
                if self.graphs.len() >= MAX_GRAPHS {
                    let lru = (0..self.graphs.len()).min_by_key(|&i| self.graphs[i].used).expect("non-empty");
                    self.graphs.remove(lru);
                }
                self.graphs.push(Graph { exec, graph: g, sigs: std::mem::take(&mut self.sigs), used: self.clock });
                self.records += 1;
                self.record_failures = 0;
                self.graphs.len() - 1
            }
            Mode::Replay => {
                let Some(&i) = self.candidates.iter().find(|&&g| self.graphs[g].sigs.len() == self.pos) else {
                    self.broken = true;
                    return Err(broken_err());
                };
                self.graphs[i].used = self.clock;
                self.replays += 1;
                i
            }
            Mode::Eager => unreachable!(),
        };
        let exec = self.graphs[idx].exec;
        // SAFETY: valid instantiated graph and stream.
        let r = unsafe { sys::cuGraphLaunch(exec, stream) };
        if r != sys::CUresult::CUDA_SUCCESS {
            self.graphs.remove(idx);
            return Err(Error::Device(format!("cuda: launching the decode graph failed ({r:?})")));
        }
        self.flushed = true;
        Ok(())
    }

    /// Ends the step; true = run it again (nothing of it ran).
    pub fn step_end(&mut self, stream: CUstream) -> Result<bool> {
        let mode = self.mode;
        let mut again = false;
        match mode {
            Mode::Eager => {
                if !self.broken {
                    self.warm = true;
                }
                self.eager += 1;
            }
            _ => {
                let ok = !self.broken && self.flush(stream).is_ok();
                if !ok {
                    self.abort(stream);
                    again = true;
                    if mode == Mode::Record {
                        self.record_failures += 1;
                        self.next = Some(Mode::Eager);
                    } else if self.setup {
                        // a replay met an op that cannot be recorded (a new model's or batch's
                        // first step allocates): a recording would fail the same way, and count
                        // towards switching capture off, so the retry runs eager
                        self.next = Some(Mode::Eager);
                    } else {
                        // no graph fits this step: record it on the retry
                        self.next = Some(Mode::Record);
                    }
                }
            }
        }
        self.in_step = false;
        self.mode = Mode::Eager;
        Ok(again)
    }
}
