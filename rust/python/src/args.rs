//! Argument comparison and tier labelling: Python objects become
//! `serde_json::Value`s here (with the GIL), the work runs without it.

use std::cell::RefCell;
use std::collections::HashMap;

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde_json::{Map, Value};
use turnrl_core::args::{
    self as core_args, canonicalize, compare_canonical, compare_canonical_many, try_canonicalize,
    ArgSource, Canonical, Comparison, Policy, SourceError, SourceKind, Tier, ToolKind, MAX_DEPTH,
};
use turnrl_core::Error;

use crate::errors::{detached, to_pyerr};

/// Why a Python object is not JSON; the path is filled in on the way out
/// (innermost segment first).
pub(crate) struct ConvertError {
    segs: Vec<String>,
    message: String,
}

impl ConvertError {
    fn new(message: String) -> Self {
        ConvertError {
            segs: Vec::new(),
            message,
        }
    }

    fn into_pyerr(self, py: Python<'_>, what: &str) -> PyErr {
        let mut path = what.to_string();
        for seg in self.segs.iter().rev() {
            path.push_str(seg);
        }
        to_pyerr(py, Error::invalid(format!("{path}: {}", self.message)))
    }
}

fn key_segment(key: &str) -> String {
    let plain = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        format!(".{key}")
    } else {
        format!("[{}]", serde_json::to_string(key).unwrap_or_default())
    }
}

pub(crate) type Converted = std::result::Result<Value, ConvertError>;

/// A Python object as JSON: dict (string keys), list, tuple, str, int, float
/// (finite), bool, None. Integers beyond 64 bits become their decimal string,
/// which the comparison treats as the same number.
pub(crate) fn to_json(obj: &Bound<'_, PyAny>, depth: usize) -> Converted {
    if obj.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(s) = obj.cast::<PyString>() {
        let text = s
            .to_str()
            .map_err(|e| ConvertError::new(format!("string is not valid UTF-8 ({e})")))?;
        return Ok(Value::String(text.to_owned()));
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.cast::<PyInt>().is_ok() {
        return int_to_json(obj);
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        let x = f.value();
        return serde_json::Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| ConvertError::new(format!("{x} is not a finite number")));
    }
    if let Ok(dict) = obj.cast::<PyDict>() {
        if depth >= MAX_DEPTH {
            return Err(too_deep());
        }
        let mut map = Map::with_capacity(dict.len());
        for (k, v) in dict.iter() {
            let key = match k.cast::<PyString>() {
                Ok(s) => s
                    .to_str()
                    .map_err(|e| ConvertError::new(format!("key is not valid UTF-8 ({e})")))?
                    .to_owned(),
                Err(_) => {
                    let shown = k.repr().map(|r| r.to_string()).unwrap_or_default();
                    let ty = type_name(&k);
                    return Err(ConvertError::new(format!(
                        "key {shown} of type {ty} is not a string (JSON object keys are strings)"
                    )));
                }
            };
            let value = to_json(&v, depth + 1).map_err(|mut e| {
                e.segs.push(key_segment(&key));
                e
            })?;
            map.insert(key, value);
        }
        return Ok(Value::Object(map));
    }
    if let Ok(list) = obj.cast::<PyList>() {
        return seq_to_json(list.iter(), list.len(), depth);
    }
    if let Ok(tuple) = obj.cast::<PyTuple>() {
        return seq_to_json(tuple.iter(), tuple.len(), depth);
    }
    if let Some(plain) = numpy_to_python(obj) {
        return to_json(&plain, depth);
    }
    // Other integer-likes.
    if obj.hasattr("__index__").unwrap_or(false) {
        if let Ok(index) = obj.call_method0("__index__") {
            return int_to_json(&index);
        }
    }
    Err(ConvertError::new(format!(
        "a {} is not JSON (expected dict, list, tuple, str, int, float, bool or None)",
        qualified_type_name(obj)
    )))
}

/// A numpy scalar or array as the plain Python value numpy gives for it
/// (`tolist()`: `numpy.bool` becomes bool, `numpy.float32` float, an array
/// nested lists); `None` for anything else. Reached only for objects that
/// are none of the plain types, so it costs the usual case nothing.
fn numpy_to_python<'py>(obj: &Bound<'py, PyAny>) -> Option<Bound<'py, PyAny>> {
    let module = obj.get_type().module().ok()?;
    if module.to_str().ok()? != "numpy" {
        return None;
    }
    obj.call_method0("tolist").ok()
}

/// `module.Name` for types outside builtins (`numpy.bool`, not `bool`).
fn qualified_type_name(obj: &Bound<'_, PyAny>) -> String {
    let name = type_name(obj);
    match obj.get_type().module() {
        Ok(module) if module.to_str().is_ok_and(|m| m != "builtins") => format!("{module}.{name}"),
        _ => name,
    }
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn too_deep() -> ConvertError {
    ConvertError::new(format!("nested deeper than {MAX_DEPTH} levels"))
}

fn int_to_json(obj: &Bound<'_, PyAny>) -> Converted {
    if let Ok(i) = obj.extract::<i64>() {
        return Ok(Value::from(i));
    }
    if let Ok(u) = obj.extract::<u64>() {
        return Ok(Value::from(u));
    }
    let text = obj
        .str()
        .map_err(|e| ConvertError::new(format!("integer has no decimal form ({e})")))?;
    Ok(Value::String(text.to_string()))
}

fn seq_to_json<'py>(
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    len: usize,
    depth: usize,
) -> Converted {
    if depth >= MAX_DEPTH {
        return Err(too_deep());
    }
    let mut out = Vec::with_capacity(len);
    for (i, item) in items.enumerate() {
        out.push(to_json(&item, depth + 1).map_err(|mut e| {
            e.segs.push(format!("[{i}]"));
            e
        })?);
    }
    Ok(Value::Array(out))
}

fn convert(py: Python<'_>, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Value> {
    to_json(obj, 0).map_err(|e| e.into_pyerr(py, what))
}

/// The comparison policy from the keywords every function here takes.
fn policy(
    py: Python<'_>,
    case_fold: bool,
    unordered_keys: Option<&Bound<'_, PyAny>>,
    soft_max_fraction: f64,
) -> PyResult<Policy> {
    Ok(Policy {
        case_fold,
        unordered_keys: match unordered_keys {
            Some(keys) => key_names(py, keys)?,
            None => Vec::new(),
        },
        soft_max_fraction,
    })
}

/// `unordered_keys` as a caller gives it: any iterable of names (empty, or
/// an empty string, meaning none); a non-empty string is refused, since it
/// would iterate as letters.
fn key_names(py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<Vec<String>> {
    if let Ok(text) = keys.cast::<PyString>() {
        if text.to_str()?.is_empty() {
            return Ok(Vec::new());
        }
        return Err(to_pyerr(
            py,
            Error::invalid(format!(
                "unordered_keys must be an iterable of key names, not the string {}",
                text.repr()?
            )),
        ));
    }
    keys.try_iter()?
        .map(|key| key?.extract::<String>())
        .collect()
}

/// The result of `compare_args`.
#[pyclass(frozen, module = "turnrl._core", name = "ArgComparison")]
pub struct ArgComparison {
    inner: Comparison,
}

#[pymethods]
impl ArgComparison {
    /// "exact", "soft" or "mismatch".
    #[getter]
    fn kind(&self) -> &'static str {
        self.inner.kind.as_str()
    }

    /// Paths that differ, such as ``passengers[0].dob``; ``$`` is the root.
    #[getter]
    fn diffs(&self) -> Vec<String> {
        self.inner.diffs.clone()
    }

    /// Leaves (scalars) whose values differ.
    #[getter]
    fn differing_leaves(&self) -> usize {
        self.inner.differing_leaves
    }

    /// Leaves of the normalised gold value.
    #[getter]
    fn gold_leaves(&self) -> usize {
        self.inner.gold_leaves
    }

    /// Whether key sets, list lengths or container kinds differ.
    #[getter]
    fn structural(&self) -> bool {
        self.inner.structural
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let kind = PyString::new(py, self.inner.kind.as_str()).repr()?;
        let diffs = PyList::new(py, &self.inner.diffs)?.repr()?;
        Ok(format!("ArgComparison(kind={kind}, diffs={diffs})"))
    }
}

/// Where the UTF-8 text a [`Canonical`] borrows comes from, and what keeps
/// it alive.
///
/// Holding: every Python string read is held (a strong reference) until the
/// arena is dropped, so the text stays valid whatever code runs meanwhile:
/// other threads while the GIL is released, `__index__` or numpy
/// conversions, a garbage collection's finalizers.
///
/// Borrowing (CPython with the GIL only): nothing is held. The source reads
/// only exact `dict`, `list`, `str`, `int`, `float`, `bool` and `None`,
/// through calls that run no Python code and allocate no object the garbage
/// collector tracks when they succeed (type checks, `PyDict_Next`, list
/// items, `PyUnicode_AsUTF8AndSize`, `PyLong_AsLongLongAndOverflow`, the
/// float's value); with the GIL held throughout, nothing else runs, so the
/// caller's containers keep their items and the strings they hold stay
/// alive while the trees are compared. Anything else (another type, an
/// integer beyond 64 bits, a string that is not UTF-8) gives up
/// ([`SourceError::retry`]), and the caller starts over holding. Giving up
/// can itself run Python code (the failed UTF-8 read raises, and allocating
/// the exception can start a garbage collection, with its callbacks and
/// finalizers), so after a retry nothing of the partial trees is read: the
/// normaliser unwinds without formatting paths, and they are dropped unread.
/// Errors become Python exceptions only after the trees are dropped. Holding
/// cost compare_args about 5% of its time (benches/RESULTS.md).
struct Arena<'py> {
    held: RefCell<Vec<Bound<'py, PyAny>>>,
    holds: bool,
}

impl<'py> Arena<'py> {
    fn holding() -> Self {
        // Room for the strings of typical tool arguments without regrowing.
        Arena {
            held: RefCell::new(Vec::with_capacity(64)),
            holds: true,
        }
    }

    /// Only where the GIL serialises all Python code: under free threading
    /// another thread could change the containers while they are read.
    #[cfg(not(any(Py_GIL_DISABLED, PyPy, GraalPy)))]
    fn borrowing() -> Self {
        Arena {
            held: RefCell::new(Vec::new()),
            holds: false,
        }
    }

    fn hold_str<'a>(&'a self, s: &Bound<'py, PyString>) -> Result<&'a str, SourceError> {
        let text: *const str = match compact_ascii(s).map_or_else(|| s.to_str(), Ok) {
            Ok(text) => text,
            Err(_) if !self.holds => return Err(SourceError::retry()),
            Err(e) => return Err(SourceError::new(format!("string is not valid UTF-8 ({e})"))),
        };
        if self.holds {
            self.held.borrow_mut().push(s.clone().into_any());
        }
        // SAFETY: `to_str` returns the UTF-8 buffer that CPython caches
        // inside the (immutable) str object and frees only with it (in both
        // builds: the default one and the stable ABI from 3.10 on). Holding,
        // the arena holds a strong reference to that object until it is
        // dropped, which outlives 'a. Borrowing, the caller's containers
        // hold it for as long as no Python code runs (see [`Arena`]), and
        // the trees are dropped before any does.
        Ok(unsafe { &*text })
    }
}

/// The text of a compact ASCII string (nearly every key and value), read
/// from the object's header: `PyUnicode_AsUTF8AndSize` was a sixteenth of
/// compare_args on whole records. `None` for other strings, and where the
/// header is not ours to read (the stable ABI, CPython 3.14's opaque
/// bit-fields, other interpreters).
#[cfg(not(any(Py_LIMITED_API, Py_3_14, PyPy, GraalPy)))]
#[inline]
fn compact_ascii<'s>(s: &'s Bound<'_, PyString>) -> Option<&'s str> {
    let op = s.as_ptr();
    // SAFETY: `op` is a live str. A compact ASCII str (always "ready") keeps
    // its `length` ASCII bytes right after its `PyASCIIObject` header, for
    // as long as the object lives, which `s` guarantees for 's.
    unsafe {
        if ffi::PyUnicode_IS_COMPACT_ASCII(op) == 0 {
            return None;
        }
        let len = usize::try_from(ffi::PyUnicode_GET_LENGTH(op)).ok()?;
        let data = op.cast::<ffi::PyASCIIObject>().add(1).cast::<u8>();
        Some(std::str::from_utf8_unchecked(std::slice::from_raw_parts(
            data, len,
        )))
    }
}

#[cfg(any(Py_LIMITED_API, Py_3_14, PyPy, GraalPy))]
#[inline]
fn compact_ascii<'s>(_: &'s Bound<'_, PyString>) -> Option<&'s str> {
    None
}

/// A Python object read in place as an [`ArgSource`]: no `serde_json::Value`
/// copy, strings borrowed.
struct PySource<'a, 'py> {
    obj: Bound<'py, PyAny>,
    arena: &'a Arena<'py>,
}

impl<'a, 'py> PySource<'a, 'py> {
    fn child(&self, obj: Bound<'py, PyAny>) -> Self {
        PySource {
            obj,
            arena: self.arena,
        }
    }

    fn int_kind(&self, obj: &Bound<'py, PyAny>) -> Result<SourceKind<'a>, SourceError> {
        if !self.arena.holds {
            // `extract` would raise OverflowError beyond 64 bits, and an
            // exception is an object the garbage collector tracks.
            let mut overflow = 0;
            // SAFETY: `obj` is an exact int (checked by the caller), for
            // which this reads the value and sets no exception.
            let value = unsafe { ffi::PyLong_AsLongLongAndOverflow(obj.as_ptr(), &mut overflow) };
            if value == -1 && PyErr::occurred(obj.py()) {
                drop(PyErr::take(obj.py()));
                return Err(SourceError::retry());
            }
            return if overflow == 0 {
                Ok(SourceKind::Int(value))
            } else {
                Err(SourceError::retry())
            };
        }
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(SourceKind::Int(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(SourceKind::UInt(u));
        }
        let text = obj
            .str()
            .map_err(|e| SourceError::new(format!("integer has no decimal form ({e})")))?;
        Ok(SourceKind::BigInt(self.arena.hold_str(&text)?))
    }
}

impl<'a, 'py> PySource<'a, 'py> {
    /// [`ArgSource::kind`] for anything but the exact plain types:
    /// subclasses, tuples, numpy values, integer-likes. Out of line, so the
    /// usual case stays small enough to inline.
    #[cold]
    #[inline(never)]
    fn other_kind(&self) -> Result<SourceKind<'a>, SourceError> {
        if !self.arena.holds {
            return Err(SourceError::retry());
        }
        let obj = &self.obj;
        if let Ok(s) = obj.cast::<PyString>() {
            return Ok(SourceKind::Str(self.arena.hold_str(s)?));
        }
        if let Ok(b) = obj.cast::<PyBool>() {
            return Ok(SourceKind::Bool(b.is_true()));
        }
        if obj.cast::<PyInt>().is_ok() {
            return self.int_kind(obj);
        }
        if let Ok(f) = obj.cast::<PyFloat>() {
            return Ok(SourceKind::Float(f.value()));
        }
        if let Ok(dict) = obj.cast::<PyDict>() {
            return Ok(SourceKind::Map(dict.len()));
        }
        if let Ok(list) = obj.cast::<PyList>() {
            return Ok(SourceKind::List(list.len()));
        }
        if let Ok(tuple) = obj.cast::<PyTuple>() {
            return Ok(SourceKind::List(tuple.len()));
        }
        if let Some(plain) = numpy_to_python(obj) {
            return self.child(plain).kind();
        }
        if obj.hasattr("__index__").unwrap_or(false) {
            if let Ok(index) = obj.call_method0("__index__") {
                return self.int_kind(&index);
            }
        }
        Err(SourceError::new(format!(
            "a {} is not JSON (expected dict, list, tuple, str, int, float, bool or None)",
            qualified_type_name(obj)
        )))
    }

    /// [`ArgSource::each_item`] for tuples and numpy arrays.
    #[cold]
    #[inline(never)]
    fn other_items(
        &self,
        f: &mut dyn FnMut(usize, Self) -> Result<(), SourceError>,
    ) -> Result<(), SourceError> {
        if !self.arena.holds {
            return Err(SourceError::retry());
        }
        if let Ok(tuple) = self.obj.cast::<PyTuple>() {
            for (i, item) in tuple.iter().enumerate() {
                f(i, self.child(item))?;
            }
        } else if let Some(plain) = numpy_to_python(&self.obj) {
            return self.child(plain).each_item(f);
        }
        Ok(())
    }
}

impl<'a, 'py> ArgSource<'a> for PySource<'a, 'py> {
    fn kind(&self) -> Result<SourceKind<'a>, SourceError> {
        let obj = &self.obj;
        if obj.is_none() {
            return Ok(SourceKind::Null);
        }
        // Exact types first: a pointer comparison each, where the subclass
        // checks below cost a call into the interpreter each in the abi3
        // build (and read the type's flags in the default one).
        if obj.is_exact_instance_of::<PyString>() {
            let s = obj
                .cast::<PyString>()
                .map_err(|e| SourceError::new(e.to_string()))?;
            return Ok(SourceKind::Str(self.arena.hold_str(s)?));
        }
        if obj.is_exact_instance_of::<PyDict>() {
            return Ok(SourceKind::Map(obj.len().unwrap_or(0)));
        }
        if obj.is_exact_instance_of::<PyList>() {
            return Ok(SourceKind::List(obj.len().unwrap_or(0)));
        }
        if obj.is_exact_instance_of::<PyInt>() {
            return self.int_kind(obj);
        }
        if obj.is_exact_instance_of::<PyFloat>() {
            let x: f64 = obj
                .extract()
                .map_err(|e: PyErr| SourceError::new(e.to_string()))?;
            return Ok(SourceKind::Float(x));
        }
        if obj.is_exact_instance_of::<PyBool>() {
            return Ok(SourceKind::Bool(obj.is_truthy().unwrap_or(false)));
        }
        self.other_kind()
    }

    fn each_item(
        &self,
        f: &mut dyn FnMut(usize, Self) -> Result<(), SourceError>,
    ) -> Result<(), SourceError> {
        if let Ok(list) = self.obj.cast::<PyList>() {
            for (i, item) in list.iter().enumerate() {
                f(i, self.child(item))?;
            }
        } else {
            self.other_items(f)?;
        }
        Ok(())
    }

    fn each_entry(
        &self,
        f: &mut dyn FnMut(&'a str, Self) -> Result<(), SourceError>,
    ) -> Result<(), SourceError> {
        if let Ok(dict) = self.obj.cast::<PyDict>() {
            for (k, v) in dict.iter() {
                let Ok(key) = k.cast::<PyString>() else {
                    if !self.arena.holds {
                        return Err(SourceError::retry());
                    }
                    let shown = k.repr().map(|r| r.to_string()).unwrap_or_default();
                    return Err(SourceError::new(format!(
                        "key {shown} of type {} is not a string (JSON object keys are strings)",
                        type_name(&k)
                    )));
                };
                let key = self.arena.hold_str(key)?;
                f(key, self.child(v))?;
            }
        }
        Ok(())
    }
}

/// The canonical form of `obj`; `None` where a borrowing read gave up. The
/// error is turnrl's own, not yet a Python exception: making one runs Python
/// code, which must wait until borrowed trees are dropped.
fn read_tree<'a, 'py>(
    obj: &Bound<'py, PyAny>,
    arena: &'a Arena<'py>,
    policy: &Policy,
    what: &str,
) -> turnrl_core::Result<Option<Canonical<'a>>> {
    let source = PySource {
        obj: obj.clone(),
        arena,
    };
    try_canonicalize(source, policy, what)
}

/// Canonical forms of `objs`, read borrowing where that works (see
/// [`Arena`]), else holding, and handed to `f`.
fn with_canonical<'py, T, const N: usize>(
    py: Python<'py>,
    objs: [(&Bound<'py, PyAny>, &str); N],
    policy: &Policy,
    f: impl Fn([Canonical<'_>; N]) -> T,
) -> PyResult<T> {
    #[cfg(not(any(Py_GIL_DISABLED, PyPy, GraalPy)))]
    {
        let arena = Arena::borrowing();
        // `f` only compares the trees or copies them into Rust values, and
        // the trees are dropped when this returns, before any error becomes
        // a Python exception.
        let borrowed = || -> turnrl_core::Result<Option<T>> {
            let mut trees: [Option<Canonical<'_>>; N] = std::array::from_fn(|_| None);
            for (tree, (obj, what)) in trees.iter_mut().zip(objs) {
                *tree = read_tree(obj, &arena, policy, what)?;
                if tree.is_none() {
                    return Ok(None);
                }
            }
            Ok(Some(
                f(trees.map(|tree| tree.expect("every tree was read"))),
            ))
        };
        match borrowed() {
            Ok(Some(out)) => return Ok(out),
            Ok(None) => {}
            Err(e) => return Err(to_pyerr(py, e)),
        }
    }
    let arena = Arena::holding();
    let mut trees: [Option<Canonical<'_>>; N] = std::array::from_fn(|_| None);
    for (tree, (obj, what)) in trees.iter_mut().zip(objs) {
        let read = read_tree(obj, &arena, policy, what).map_err(|e| to_pyerr(py, e))?;
        *tree =
            Some(read.ok_or_else(|| to_pyerr(py, Error::invalid(format!("{what}: unreadable"))))?);
    }
    Ok(f(trees.map(|tree| tree.expect("every tree was read"))))
}

/// Canonical form of a JSON-like object (see `turnrl.normalize_args`).
#[pyfunction]
#[pyo3(signature = (obj, case_fold=false, unordered_keys=None))]
pub fn normalize_args<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    case_fold: bool,
    unordered_keys: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let policy = policy(py, case_fold, unordered_keys, 0.5)?;
    let value = with_canonical(py, [(obj, "obj")], &policy, |[tree]| tree.to_value())?;
    crate::parse::value_to_py(py, &value)
}

/// Compare predicted tool-call arguments with the gold ones.
///
/// Returns an :class:`ArgComparison` with ``.kind`` (``"exact"``,
/// ``"soft"`` or ``"mismatch"``), ``.diffs`` (paths that differ, sorted:
/// ``user_id``, ``passengers[0].dob``, ``payment_methods[2]``; keys that are
/// not identifiers are written ``["odd key"]``), ``.differing_leaves``,
/// ``.gold_leaves`` and ``.structural`` (key sets or list lengths differ:
/// never soft). A missing or extra key, or an element past the other list's
/// end, is reported at its own path. See :mod:`turnrl.args` for the rules
/// and the policy keywords.
///
/// >>> compare_args({"n": "5", "id": " AB "}, {"id": "AB", "n": 5.0}).kind
/// 'exact'
//
// This is the public function itself, not wrapped in Python: a call is well
// under a microsecond, and a Python layer around it cost a sixth of that. It
// reads the Python objects in place and compares under the GIL, since
// releasing and retaking the GIL would cost more than the comparison;
// `compare_args_batch` releases it.
#[pyfunction]
#[pyo3(signature = (pred, gold, *, case_fold=false, unordered_keys=None, soft_max_fraction=0.5))]
pub fn compare_args(
    py: Python<'_>,
    pred: &Bound<'_, PyAny>,
    gold: &Bound<'_, PyAny>,
    case_fold: bool,
    unordered_keys: Option<&Bound<'_, PyAny>>,
    soft_max_fraction: f64,
) -> PyResult<ArgComparison> {
    let policy = policy(py, case_fold, unordered_keys, soft_max_fraction)?;
    let inner = with_canonical(py, [(pred, "pred"), (gold, "gold")], &policy, |[p, g]| {
        compare_canonical(&p, &g, &policy)
    })?;
    Ok(ArgComparison { inner })
}

/// Many comparisons at once: normalises pairs with the GIL, 256 at a time,
/// and compares each chunk without it.
#[pyfunction]
#[pyo3(signature = (pairs, case_fold=false, unordered_keys=None, soft_max_fraction=0.5))]
pub fn compare_args_batch(
    py: Python<'_>,
    pairs: &Bound<'_, PyAny>,
    case_fold: bool,
    unordered_keys: Option<&Bound<'_, PyAny>>,
    soft_max_fraction: f64,
) -> PyResult<Vec<ArgComparison>> {
    let policy = policy(py, case_fold, unordered_keys, soft_max_fraction)?;
    policy.validate().map_err(|e| to_pyerr(py, e))?;
    // Chunks keep the normalised trees in cache between building them (with
    // the GIL) and comparing them (without it).
    const CHUNK: usize = 256;
    let mut out = Vec::new();
    let mut iter = pairs.try_iter()?.enumerate().peekable();
    while iter.peek().is_some() {
        // Holding: the GIL is released while the chunk is compared.
        let arena = Arena::holding();
        let mut canonical = Vec::with_capacity(CHUNK);
        for (i, pair) in iter.by_ref().take(CHUNK) {
            let pair = pair?;
            let (pred, gold): (Bound<'_, PyAny>, Bound<'_, PyAny>) =
                pair.extract().map_err(|_| {
                    to_pyerr(
                        py,
                        Error::invalid(format!("pairs[{i}] must be a (pred, gold) pair")),
                    )
                })?;
            let p = canonicalize(
                PySource {
                    obj: pred,
                    arena: &arena,
                },
                &policy,
                "pred",
            )
            .map_err(|e| to_pyerr(py, prefix_pair(e, i)))?;
            let g = canonicalize(
                PySource {
                    obj: gold,
                    arena: &arena,
                },
                &policy,
                "gold",
            )
            .map_err(|e| to_pyerr(py, prefix_pair(e, i)))?;
            canonical.push((p, g));
        }
        let chunk = detached(py, || Ok(compare_canonical_many(&canonical, &policy)))?;
        out.extend(chunk.into_iter().map(|inner| ArgComparison { inner }));
    }
    Ok(out)
}

fn prefix_pair(err: Error, i: usize) -> Error {
    Error::invalid(format!("pairs[{i}].{err}"))
}

/// Tiers of one trajectory (see `turnrl.label_tiers`).
#[pyclass(frozen, module = "turnrl._core", name = "TierLabels")]
pub struct TierLabels {
    inner: core_args::TierLabels,
}

fn tier_names(tiers: &[Tier]) -> Vec<&'static str> {
    tiers.iter().map(|t| t.as_str()).collect()
}

#[pymethods]
impl TierLabels {
    /// Per input turn: the tier of an assistant turn, None for other roles.
    #[getter]
    fn tiers(&self) -> Vec<Option<&'static str>> {
        self.inner
            .tiers
            .iter()
            .map(|t| t.map(Tier::as_str))
            .collect()
    }

    /// Per input turn: the tier of each of its tool calls.
    #[getter]
    fn call_tiers(&self) -> Vec<Vec<&'static str>> {
        self.inner
            .call_tiers
            .iter()
            .map(|c| tier_names(c))
            .collect()
    }

    /// Indices of the gold actions matched exactly, ascending.
    #[getter]
    fn matched_gold(&self) -> Vec<usize> {
        self.inner.matched_gold.clone()
    }

    /// Indices of the gold actions that earned a soft match, ascending.
    #[getter]
    fn soft_gold(&self) -> Vec<usize> {
        self.inner.soft_gold.clone()
    }

    /// Per gold action, the index of the turn that matched it exactly.
    #[getter]
    fn gold_turn(&self) -> Vec<Option<usize>> {
        self.inner.gold_turn.clone()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let tiers = self.tiers().into_pyobject(py)?.repr()?;
        let matched = PyList::new(py, &self.inner.matched_gold)?.repr()?;
        Ok(format!("TierLabels(tiers={tiers}, matched_gold={matched})"))
    }
}

/// The fields of a turn the labelling reads; anything else (token ids,
/// metadata) is never converted.
const TURN_FIELDS: [&str; 5] = ["role", "content", "name", "tool_calls", "errors"];

/// One tool call as JSON, never failing: whatever cannot be read (a field
/// that is not JSON, arguments holding NaN or nested too deep, arguments text
/// that is not JSON) is left in a form the labelling reads as an unreadable
/// call, which makes that call `error` and no other.
fn call_to_json(py: Python<'_>, call: &Bound<'_, PyAny>) -> Value {
    let Ok(dict) = call.cast::<PyDict>() else {
        return to_json(call, 0).unwrap_or(Value::Null);
    };
    let mut map = Map::new();
    for (key, value) in dict.iter() {
        let Ok(key) = key.extract::<String>() else {
            continue;
        };
        let converted = match key.as_str() {
            "arguments" => arguments_to_json(py, &value),
            "function" if value.cast::<PyDict>().is_ok() => call_to_json(py, &value),
            _ => match to_json(&value, 0) {
                Ok(v) => v,
                Err(_) => continue,
            },
        };
        map.insert(key, converted);
    }
    Value::Object(map)
}

/// Arguments as JSON. Text is decoded by Python's `json`, so integers of any
/// size keep every digit (as they do in dict arguments); what cannot be read
/// becomes text that is not a JSON object.
fn arguments_to_json(py: Python<'_>, arguments: &Bound<'_, PyAny>) -> Value {
    static LOADS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let unreadable = |why: String| Value::String(format!("unreadable arguments: {why}"));
    let decoded = match arguments.cast::<PyString>() {
        Ok(text) => {
            let loads = match LOADS.import(py, "json", "loads") {
                Ok(loads) => loads,
                Err(e) => return unreadable(e.to_string()),
            };
            match loads.call1((text,)) {
                Ok(value) => value,
                // Not JSON: the text itself, which the labelling cannot read.
                Err(_) => return to_json(arguments, 0).unwrap_or(Value::Null),
            }
        }
        Err(_) => arguments.clone(),
    };
    to_json(&decoded, 0).unwrap_or_else(|e| unreadable(e.message))
}

/// Tier of every assistant turn of a `turnrl.rollout/1` trajectory.
#[pyfunction]
#[pyo3(signature = (turns, gold_actions, tool_kinds, *, case_fold=false, unordered_keys=None, soft_max_fraction=0.5))]
pub fn label_tiers(
    py: Python<'_>,
    turns: &Bound<'_, PyAny>,
    gold_actions: &Bound<'_, PyAny>,
    tool_kinds: HashMap<String, String>,
    case_fold: bool,
    unordered_keys: Option<&Bound<'_, PyAny>>,
    soft_max_fraction: f64,
) -> PyResult<TierLabels> {
    let mut kinds = HashMap::with_capacity(tool_kinds.len());
    for (name, kind) in tool_kinds {
        let parsed = ToolKind::from_name(&kind).map_err(|_| {
            to_pyerr(
                py,
                Error::invalid(format!(
                    "tool_kinds[{name:?}] must be \"read\" or \"write\", got {kind:?}"
                )),
            )
        })?;
        kinds.insert(name, parsed);
    }
    let mut turn_values = Vec::new();
    for (t, turn) in turns.try_iter()?.enumerate() {
        let turn = turn?;
        let Ok(dict) = turn.cast::<PyDict>() else {
            return Err(to_pyerr(
                py,
                Error::invalid(format!(
                    "turns[{t}] must be a dict, got {}",
                    type_name(&turn)
                )),
            ));
        };
        let mut map = Map::new();
        for field in TURN_FIELDS {
            if let Some(v) = dict.get_item(field)? {
                let value = match v.cast::<PyList>() {
                    Ok(calls) if field == "tool_calls" => {
                        Value::Array(calls.iter().map(|c| call_to_json(py, &c)).collect())
                    }
                    _ => convert(py, &v, &format!("turns[{t}].{field}"))?,
                };
                map.insert(field.to_string(), value);
            }
        }
        turn_values.push(Value::Object(map));
    }
    let gold = match convert(py, gold_actions, "gold_actions")? {
        Value::Array(items) => items,
        _ => {
            return Err(to_pyerr(
                py,
                Error::invalid("gold_actions must be a list of {name, arguments} dicts"),
            ))
        }
    };
    let policy = policy(py, case_fold, unordered_keys, soft_max_fraction)?;
    let inner = detached(py, || {
        core_args::label_tiers(&turn_values, &gold, &kinds, &policy)
    })?;
    Ok(TierLabels { inner })
}
