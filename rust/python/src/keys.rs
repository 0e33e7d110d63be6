//! Dict keys and tool names made into Python strings once per thread and
//! reused.
//!
//! Tool-call arguments repeat the same few keys (`reservation_id`,
//! `flight_number`, ...) in every call. Building each as a new `str` costs an
//! allocation, a UTF-8 decode and, when it goes into a dict, a SipHash of its
//! text; a cached `str` already carries its hash, so reusing it costs one
//! reference count. The cache is direct-mapped (a new key evicts whatever
//! held its slot) and per thread, so it needs no lock.

use std::cell::RefCell;

use pyo3::prelude::*;
use pyo3::types::PyString;

const SLOTS: usize = 1024;
/// Longer keys are rare and are built each time.
const MAX_LEN: usize = 64;

/// When a thread exits, its keys are released through PyO3's deferred
/// reference pool (the thread is no longer attached to the interpreter then),
/// so threads that come and go leave nothing behind; an evicted key is
/// released at once, with the thread attached.
struct Slot {
    text: Box<str>,
    key: Py<PyString>,
}

struct KeyCache {
    slots: Vec<Option<Slot>>,
}

thread_local! {
    static KEYS: RefCell<KeyCache> = RefCell::new(KeyCache {
        slots: (0..SLOTS).map(|_| None).collect(),
    });
}

fn slot_of(text: &[u8]) -> usize {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mut h = text.len() as u64;
    let mut words = text.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        h = (h.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
    }
    let mut tail = 0u64;
    for (i, b) in words.remainder().iter().enumerate() {
        tail |= u64::from(*b) << (8 * i);
    }
    h = (h.rotate_left(5) ^ tail).wrapping_mul(K);
    (h >> (64 - SLOTS.trailing_zeros())) as usize
}

/// A Python `str` equal to `text`, from this thread's cache when it holds
/// one (its hash already computed), else new and put in the cache.
pub(crate) fn key<'py>(py: Python<'py>, text: &str) -> Bound<'py, PyString> {
    if text.len() > MAX_LEN {
        return PyString::new(py, text);
    }
    let cached = KEYS.try_with(|cache| {
        // Busy only if building a key ran Python code (a garbage collection
        // calling `__del__`) that parses again on this thread.
        let mut cache = cache.try_borrow_mut().ok()?;
        let slot = &mut cache.slots[slot_of(text.as_bytes())];
        if let Some(hit) = slot.as_ref().filter(|s| &*s.text == text) {
            return Some(hit.key.bind(py).clone());
        }
        let key = PyString::new(py, text);
        // Computes and stores the hash inside the str; it cannot fail for
        // a str.
        let _ = key.hash();
        let evicted = slot.replace(Slot {
            text: text.into(),
            key: key.clone().unbind(),
        });
        drop(cache);
        drop(evicted);
        Some(key)
    });
    match cached {
        Ok(Some(key)) => key,
        _ => PyString::new(py, text),
    }
}
