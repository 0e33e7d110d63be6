//! Rollout buffers (`turnrl.rollout/1`): columnar reading, line streaming for
//! full records, and the atomic writer. Reading runs without the GIL; the
//! numeric columns move into numpy without a copy.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt};
use turnrl_core::buffer as core;
use turnrl_core::Error;

use crate::errors::{detached, to_pyerr};

/// A counter of input bytes read, which a Python thread can watch while
/// `read_rollouts` works without the GIL.
#[pyclass(frozen)]
#[derive(Default)]
pub struct ReadProgress {
    bytes: core::Progress,
}

#[pymethods]
impl ReadProgress {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// Input bytes read so far (compressed bytes for zstd files).
    #[getter]
    fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Reads buffer files into columns; returns a dict of numpy arrays and lists
/// (see `turnrl.read_rollouts`).
#[pyfunction]
#[pyo3(signature = (paths, *, workers=None, progress=None))]
pub fn read_rollouts<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    workers: Option<usize>,
    progress: Option<Py<ReadProgress>>,
) -> PyResult<Bound<'py, PyDict>> {
    let counter = progress.map(|p| p.get().bytes.clone());
    let c = detached(py, || {
        core::read_columns_with_progress(&paths, workers, counter.as_ref())
    })?;
    let problems: Vec<String> = c.problems.iter().map(|p| p.to_string()).collect();
    let d = PyDict::new(py);
    d.set_item("files", c.files)?;
    d.set_item("file_index", c.file_index.into_pyarray(py))?;
    d.set_item("line", c.line.into_pyarray(py))?;
    d.set_item("task_index", c.task_index.into_pyarray(py))?;
    d.set_item("task_names", c.task_names)?;
    d.set_item("group_index", c.group_index.into_pyarray(py))?;
    d.set_item("group_names", c.group_names)?;
    d.set_item("stop_reason_index", c.stop_reason_index.into_pyarray(py))?;
    d.set_item("stop_reason_names", c.stop_reason_names)?;
    d.set_item("sample", c.sample.into_pyarray(py))?;
    d.set_item("outcome", c.outcome.into_pyarray(py))?;
    d.set_item("turn_offsets", c.turn_offsets.into_pyarray(py))?;
    d.set_item("turn_rewards", c.turn_rewards.into_pyarray(py))?;
    d.set_item("turn_tiers", c.turn_tiers.into_pyarray(py))?;
    d.set_item("tier_names", c.tier_names)?;
    d.set_item("skipped", c.skipped)?;
    d.set_item("problems", problems)?;
    Ok(d)
}

/// Checks one JSON line against `turnrl.rollout/1`; raises InvalidInputError
/// with the reason.
#[pyfunction]
pub fn check_rollout_line(py: Python<'_>, line: &str) -> PyResult<()> {
    core::check_line(line.as_bytes()).map_err(|reason| to_pyerr(py, Error::invalid(reason)))
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these values half-updated
    // in a way later calls would misread, so a poisoned lock is taken over.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Streams the valid lines of buffer files, block by block.
#[pyclass(module = "turnrl._core")]
pub struct RolloutLineReader {
    inner: Mutex<core::LineReader>,
}

#[pymethods]
impl RolloutLineReader {
    #[new]
    fn new(paths: Vec<PathBuf>) -> Self {
        RolloutLineReader {
            inner: Mutex::new(core::LineReader::new(paths)),
        }
    }

    /// The next block's valid lines as (file index, line number, text);
    /// empty when every file is read.
    fn next_lines(&self, py: Python<'_>) -> PyResult<Vec<(usize, u64, String)>> {
        let lines = detached(py, || locked(&self.inner).next_lines())?;
        Ok(lines
            .into_iter()
            .map(|l| (l.file, l.line, l.text))
            .collect())
    }

    #[getter]
    fn skipped(&self) -> u64 {
        locked(&self.inner).skipped
    }

    #[getter]
    fn problems(&self) -> Vec<String> {
        locked(&self.inner)
            .problems
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[getter]
    fn files(&self) -> Vec<String> {
        locked(&self.inner)
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect()
    }
}

/// Writes a buffer to a temporary file that replaces the target on finish().
#[pyclass(module = "turnrl._core")]
pub struct RolloutFileWriter {
    inner: Mutex<core::RolloutWriter>,
}

#[pymethods]
impl RolloutFileWriter {
    #[new]
    #[pyo3(signature = (path, compression="none", level=None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        compression: &str,
        level: Option<&Bound<'_, PyInt>>,
    ) -> PyResult<Self> {
        // Any integer; one outside zstd's range (however big) is an error
        // naming it, for a plain file too (where the level is not used).
        let zstd = match level {
            None => core::Compression::zstd(3),
            Some(level) => match level.extract::<i64>() {
                Ok(l) => core::Compression::zstd(l),
                Err(_) => Err(core::Compression::zstd_level_error(level)),
            },
        }
        .map_err(|e| to_pyerr(py, e))?;
        let compression = match compression {
            "none" => core::Compression::None,
            "zstd" => zstd,
            other => {
                return Err(to_pyerr(
                    py,
                    Error::UnknownName {
                        what: "compression",
                        name: other.to_string(),
                        valid: vec!["none".into(), "zstd".into()],
                    },
                ))
            }
        };
        let writer = detached(py, || core::RolloutWriter::create(&path, compression))?;
        Ok(RolloutFileWriter {
            inner: Mutex::new(writer),
        })
    }

    /// Appends one record given as a JSON line (validated first).
    fn write_line(&self, py: Python<'_>, line: &str) -> PyResult<()> {
        locked(&self.inner)
            .write_line(line)
            .map_err(|e| to_pyerr(py, e))
    }

    /// Appends JSON lines in order; stops at the first bad one.
    fn write_lines(&self, py: Python<'_>, lines: Vec<String>) -> PyResult<()> {
        detached(py, || {
            let mut w = locked(&self.inner);
            lines.iter().try_for_each(|l| w.write_line(l))
        })
    }

    /// Flushes, syncs and moves the file into place, then syncs its folder.
    fn finish(&self, py: Python<'_>) -> PyResult<()> {
        detached(py, || locked(&self.inner).finish())
    }

    /// Throws away what was written; the target is left untouched.
    fn abort(&self) {
        locked(&self.inner).abort()
    }

    #[getter]
    fn written(&self) -> u64 {
        locked(&self.inner).written()
    }

    #[getter]
    fn is_open(&self) -> bool {
        locked(&self.inner).is_open()
    }
}
