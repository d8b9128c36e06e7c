//! Hidden states kept where the step runs: a slab of numbered slots, stepped in place.
//!
//! The stateless [`crate::IntentModel::step`] takes every row's hidden vector in and hands it
//! back, which on a GPU means two transfers of `B × H` floats per wave. A [`ResidentStates`]
//! slab keeps the states of active users on the device instead: the caller loads a
//! user's vector once into a slot ([`ResidentStates::load`]), then each wave sends only the
//! event features and the slot numbers ([`ResidentStates::step`]) and gets the logits back;
//! [`ResidentStates::read`] brings vectors back when the caller must persist them.
//!
//! Which user holds which slot, eviction and coherence with the durable store are the caller's
//! (the operators' slot table). Two slabs exist: [`HostStates`] on the CPU (the fused kernel
//! over a slab in memory: the reference, and what tests of the slot logic run on) and, with
//! the `cuda` feature, [`crate::cuda::CudaStates`] on a GPU. Both compute a row exactly as the
//! CPU kernel does, bit for bit, whatever rows share the step.

use crate::kernel::FusedStep;
use crate::{Features, ModelError};
use std::sync::Arc;

/// One row of a resident step: a slot, whether its state restarts from zero, the event's
/// features.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResidentRow {
    /// The slot whose hidden vector is advanced (at most once per step).
    pub slot: u32,
    /// The event opened a new session: the step starts from a zero vector.
    pub reset: bool,
    /// The event's features.
    pub features: Features,
}

/// A slab of states (hidden vectors, an LSTM's memories, a convolution's partial sums), one per
/// slot, stepped in place.
pub trait ResidentStates: Send {
    /// Values per state `S` ([`crate::Cell::state_dim`]).
    fn state_dim(&self) -> usize;

    /// Number of slots.
    fn capacity(&self) -> usize;

    /// Writes `hidden` (`slots.len() × S`) into the given slots.
    ///
    /// # Errors
    ///
    /// A slot out of range, a buffer of the wrong length, device errors.
    fn load(&mut self, slots: &[u32], hidden: &[f32]) -> Result<(), ModelError>;

    /// Reads the given slots' vectors into `out` (`slots.len() × S`, replacing its contents).
    ///
    /// # Errors
    ///
    /// A slot out of range, device errors.
    fn read(&mut self, slots: &[u32], out: &mut Vec<f32>) -> Result<(), ModelError>;

    /// Advances every row's slot by one step and writes the head's raw logits to `logits`
    /// (one per row, replacing its contents). No slot may appear twice: [`HostStates`] refuses
    /// a repeated slot, the GPU slab only in debug builds (there the check would cost more
    /// than the step; a repeated slot's rows race, and which one wins is undefined).
    ///
    /// # Errors
    ///
    /// A slot out of range or repeated, device errors. After an error the stepped slots'
    /// vectors are undefined: load them again.
    fn step(&mut self, rows: &[ResidentRow], logits: &mut Vec<f32>) -> Result<(), ModelError>;
}

/// Checks slots against a slab's capacity in one pass, with a mark per slot reused across
/// calls (a slot marked with the current call's number was seen before in it).
#[derive(Debug, Default)]
pub(crate) struct SlotCheck {
    marks: Vec<u32>,
    call: u32,
}

/// The error for a slot beyond a slab of `capacity`.
pub(crate) fn out_of_range(slot: u32, capacity: usize) -> ModelError {
    ModelError::Invalid(format!("slot {slot} out of range: the slab holds {capacity}"))
}

impl SlotCheck {
    /// Checks that every slot is below `capacity` and, when `unique`, appears once.
    pub(crate) fn check(&mut self, slots: impl Iterator<Item = u32>, capacity: usize, unique: bool) -> Result<(), ModelError> {
        if unique {
            if self.marks.len() != capacity || self.call == u32::MAX {
                self.marks = vec![0; capacity];
                self.call = 0;
            }
            self.call += 1;
        }
        for slot in slots {
            let s = slot as usize;
            if s >= capacity {
                return Err(out_of_range(slot, capacity));
            }
            if unique {
                if self.marks[s] == self.call {
                    return Err(ModelError::Invalid(format!("slot {slot} stepped twice in one step")));
                }
                self.marks[s] = self.call;
            }
        }
        Ok(())
    }
}

/// A resident slab in host memory, stepped by the fused CPU kernel.
#[derive(Debug)]
pub struct HostStates {
    kernel: Arc<FusedStep>,
    states: Vec<f32>,
    capacity: usize,
    scratch: Vec<f32>,
    inputs: Vec<Features>,
    slots: SlotCheck,
}

impl HostStates {
    /// A slab of `capacity` zero vectors for `kernel`'s model.
    pub fn new(kernel: Arc<FusedStep>, capacity: usize) -> HostStates {
        let h = kernel.state_dim();
        HostStates { kernel, states: vec![0.0; capacity * h], capacity, scratch: Vec::new(), inputs: Vec::new(), slots: SlotCheck::default() }
    }
}

impl ResidentStates for HostStates {
    fn state_dim(&self) -> usize {
        self.kernel.state_dim()
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn load(&mut self, slots: &[u32], hidden: &[f32]) -> Result<(), ModelError> {
        let h = self.state_dim();
        check_rows(slots.len(), h, hidden.len())?;
        self.slots.check(slots.iter().copied(), self.capacity, false)?;
        for (&slot, v) in slots.iter().zip(hidden.chunks_exact(h)) {
            let at = slot as usize * h;
            self.states[at..at + h].copy_from_slice(v);
        }
        Ok(())
    }

    fn read(&mut self, slots: &[u32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        let h = self.state_dim();
        self.slots.check(slots.iter().copied(), self.capacity, false)?;
        out.clear();
        for &slot in slots {
            let at = slot as usize * h;
            out.extend_from_slice(&self.states[at..at + h]);
        }
        Ok(())
    }

    fn step(&mut self, rows: &[ResidentRow], logits: &mut Vec<f32>) -> Result<(), ModelError> {
        let h = self.state_dim();
        self.slots.check(rows.iter().map(|r| r.slot), self.capacity, true)?;
        self.scratch.clear();
        self.inputs.clear();
        for row in rows {
            let at = row.slot as usize * h;
            if row.reset {
                self.scratch.extend(std::iter::repeat_n(0.0, h));
            } else {
                self.scratch.extend_from_slice(&self.states[at..at + h]);
            }
            self.inputs.push(row.features);
        }
        logits.clear();
        logits.resize(rows.len(), 0.0);
        self.kernel.step(&self.inputs, &mut self.scratch, logits);
        for (row, v) in rows.iter().zip(self.scratch.chunks_exact(h)) {
            let at = row.slot as usize * h;
            self.states[at..at + h].copy_from_slice(v);
        }
        Ok(())
    }
}

/// Checks a `rows × h` buffer's length.
pub(crate) fn check_rows(rows: usize, h: usize, len: usize) -> Result<(), ModelError> {
    if len != rows * h {
        return Err(ModelError::Invalid(format!("hidden buffer holds {len} values, expected {rows}×{h}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gru::testing::{network, values};
    use crate::{Cell, GruParams, FEATURE_DIM};

    fn kernel(cell: Cell) -> Arc<FusedStep> {
        let packed = GruParams::pack(&(1..=3).map(|s| network(cell, s, FEATURE_DIM, 6, (32, 4), (8, 2))).collect::<Vec<_>>()).unwrap();
        Arc::new(FusedStep::new(&packed, 3).unwrap())
    }

    fn rows(seed: &mut u64, slots: &[u32]) -> Vec<ResidentRow> {
        slots
            .iter()
            .enumerate()
            .map(|(i, &slot)| {
                let mut dense = [0f32; FEATURE_DIM];
                dense.iter_mut().zip(values(seed, FEATURE_DIM)).for_each(|(d, x)| *d = 3.0 * x);
                ResidentRow { slot, reset: i % 5 == 4, features: Features { item: (i * 5 % 32) as u32, category: (i % 8) as u32, ..Features::dense(dense) } }
            })
            .collect()
    }

    #[test]
    fn a_resident_step_is_the_stateless_step_on_the_slots_vectors() {
        for cell in Cell::ALL {
            resident_equals_stateless(kernel(cell));
        }
    }

    fn resident_equals_stateless(kernel: Arc<FusedStep>) {
        let h = kernel.state_dim();
        let mut slab = HostStates::new(kernel.clone(), 64);
        let mut seed = 5;
        let slots: Vec<u32> = vec![7, 3, 40, 12, 63, 0];
        let start = values(&mut seed, slots.len() * h);
        slab.load(&slots, &start).unwrap();
        let rows = rows(&mut seed, &slots);
        let mut logits = Vec::new();
        slab.step(&rows, &mut logits).unwrap();

        let mut hidden = start.clone();
        for (r, v) in rows.iter().zip(hidden.chunks_exact_mut(h)) {
            if r.reset {
                v.fill(0.0);
            }
        }
        let mut expected = vec![0f32; rows.len()];
        kernel.step(&rows.iter().map(|r| r.features).collect::<Vec<_>>(), &mut hidden, &mut expected);
        assert_eq!(logits, expected);
        let mut back = Vec::new();
        slab.read(&slots, &mut back).unwrap();
        assert_eq!(back, hidden);
        // Slots not stepped keep their vectors.
        slab.read(&[1, 2], &mut back).unwrap();
        assert!(back.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn slots_out_of_range_or_stepped_twice_are_refused() {
        let mut slab = HostStates::new(kernel(Cell::Gru), 4);
        let mut seed = 1;
        let mut logits = Vec::new();
        assert!(slab.step(&rows(&mut seed, &[1, 4]), &mut logits).is_err());
        assert!(slab.step(&rows(&mut seed, &[2, 2]), &mut logits).is_err());
        assert!(slab.load(&[0], &[0.0; 3]).is_err());
        assert!(slab.read(&[9], &mut logits).is_err());
        assert!(slab.step(&rows(&mut seed, &[3, 0]), &mut logits).is_ok());
    }
}
