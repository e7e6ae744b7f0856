//! Greedy decoding kept on the device (`Backend::device_greedy`): the LM head's top-1 of each row
//! stays in a device buffer that the next step's `embed` of `CHOSEN_ID` reads, and its copy to the
//! host goes to a pinned slot behind an event. The next step is queued (its graph launched) before
//! the host has the token, so the GPU does not wait for the host between tokens.
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::result as dres;
use cudarc::driver::sys::{self, CUdeviceptr, CUevent};
use xlstm_core::{Error, Result};

use crate::device::{drv, Dev};

/// Tickets whose copies may be in flight at once; past that the oldest slot is taken back.
const SLOTS: usize = 8;

/// A pinned read-back slot: `rows` ids of `ticket` copied (or being copied) behind `done`.
struct Slot {
    host: *mut u32,
    cap: usize,
    done: CUevent,
    ticket: Option<(u64, usize)>,
}

pub(crate) struct Chosen {
    dev: Arc<Dev>,
    /// The picks of the last selection on the device: ids [rows] (u32), then their logits [rows].
    picked: CUdeviceptr,
    picked_rows: usize,
    /// Rows of the last selection: what an `embed` of `CHOSEN_ID` may take.
    rows: usize,
    slots: Vec<Slot>,
    tickets: u64,
}

// SAFETY: the pinned pointers and events belong to `dev`'s context; the backend uses them under its
// lock only.
unsafe impl Send for Chosen {}

impl Chosen {
    pub fn new(dev: Arc<Dev>) -> Self {
        Chosen { dev, picked: 0, picked_rows: 0, rows: 0, slots: Vec::new(), tickets: 0 }
    }

    /// The device ids of the last selection, when it had at least `rows` rows.
    pub fn ids_for(&self, rows: usize) -> Option<CUdeviceptr> {
        (self.picked != 0 && self.rows >= rows).then_some(self.picked)
    }

    /// The device buffer a selection of `rows` rows writes (ids, then logits). Called between
    /// steps; a buffer that must grow drops the recorded graphs, which read the old one.
    pub fn picked_for(&mut self, rows: usize) -> Result<CUdeviceptr> {
        if self.picked_rows < rows {
            self.dev.cap.lock().expect("capture lock").scratch_moved()?;
            self.dev.sync()?;
            self.dev.free(self.picked);
            self.picked = self.dev.alloc(2 * rows * 4)?;
            self.picked_rows = rows;
        }
        Ok(self.picked)
    }

    /// Queues the copy of the last selection's `rows` ids to the host; returns its ticket.
    pub fn start_readback(&mut self, rows: usize) -> Result<u64> {
        let bytes = rows * 4;
        let i = match self.slots.iter().position(|s| s.ticket.is_none() && s.cap >= bytes) {
            Some(i) => i,
            None if self.slots.len() >= SLOTS => {
                // tickets never read: take back the oldest slot (its event orders the reuse)
                let i = (0..self.slots.len()).min_by_key(|&i| self.slots[i].ticket.map_or(0, |t| t.0)).expect("slots");
                // SAFETY: the slot's event was recorded on our stream.
                unsafe { sys::cuEventSynchronize(self.slots[i].done) }.result().map_err(|e| drv("chosen ids event", e))?;
                self.slots[i].ticket = None;
                if self.slots[i].cap < bytes {
                    self.grow(i, bytes)?;
                }
                i
            }
            None => {
                let mut done: CUevent = std::ptr::null_mut();
                // SAFETY: creates an event of the bound context.
                unsafe { sys::cuEventCreate(&mut done, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) }.result().map_err(|e| drv("chosen ids event", e))?;
                self.slots.push(Slot { host: std::ptr::null_mut(), cap: 0, done, ticket: None });
                let i = self.slots.len() - 1;
                self.grow(i, bytes)?;
                i
            }
        };
        let s = &mut self.slots[i];
        // SAFETY: the slot holds `bytes`, no copy into it is queued (free slot); `picked` holds the
        // ids; both are queued on our stream after the selection.
        unsafe {
            sys::cuMemcpyDtoHAsync_v2(s.host as *mut c_void, self.picked, bytes, self.dev.stream).result().map_err(|e| drv("chosen ids copy", e))?;
            sys::cuEventRecord(s.done, self.dev.stream).result().map_err(|e| drv("chosen ids event", e))?;
        }
        self.tickets += 1;
        s.ticket = Some((self.tickets, rows));
        self.rows = rows;
        Ok(self.tickets)
    }

    /// The ids of `ticket`, waiting for its copy only (later steps may be running).
    pub fn take(&mut self, ticket: u64) -> Result<Vec<u32>> {
        let s = self
            .slots
            .iter_mut()
            .find(|s| s.ticket.is_some_and(|t| t.0 == ticket))
            .ok_or_else(|| Error::Input(format!("chosen_ids: no ticket {ticket} in flight (each is read once)")))?;
        // SAFETY: the event was recorded after the copy into `host`.
        unsafe { sys::cuEventSynchronize(s.done) }.result().map_err(|e| drv("chosen ids event", e))?;
        let rows = s.ticket.take().expect("found above").1;
        // SAFETY: the copy of `rows` ids into `host` has finished.
        Ok(unsafe { std::slice::from_raw_parts(s.host, rows) }.to_vec())
    }

    fn grow(&mut self, i: usize, bytes: usize) -> Result<()> {
        let s = &mut self.slots[i];
        let cap = bytes.max(256);
        // SAFETY: no copy into the old slot is queued (free, or its event waited for); plain pinned
        // allocation.
        unsafe {
            if !s.host.is_null() {
                dres::free_host(s.host as *mut c_void).map_err(|e| drv("free pinned", e))?;
            }
            s.host = dres::malloc_host(cap, 0).map_err(|e| drv("pinned alloc", e))? as *mut u32;
        }
        s.cap = cap;
        Ok(())
    }
}

impl Drop for Chosen {
    fn drop(&mut self) {
        if self.dev.bind().is_err() {
            return;
        }
        let _ = self.dev.sync();
        self.dev.free(self.picked);
        for s in &self.slots {
            // SAFETY: created here, released once, nothing queued uses them (synchronised).
            unsafe {
                let _ = sys::cuEventDestroy_v2(s.done);
                if !s.host.is_null() {
                    let _ = dres::free_host(s.host as *mut c_void);
                }
            }
        }
    }
}
