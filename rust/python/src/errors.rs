//! Core errors become the exception classes of `turnrl.exceptions`, which
//! also subclass the builtin a Python user would catch (ValueError, OSError).

use pyo3::prelude::*;
use pyo3::types::PyType;
use turnrl_core::Error;

fn exception_class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyType>> {
    let module = py.import("turnrl.exceptions")?;
    Ok(module.getattr(name)?.cast_into::<PyType>()?)
}

pub fn to_pyerr(py: Python<'_>, err: Error) -> PyErr {
    let class = match &err {
        Error::InvalidInput(_) => "InvalidInputError",
        Error::UnknownName { .. } => "UnknownNameError",
        Error::Io { .. } => "TurnrlIOError",
    };
    match exception_class(py, class) {
        Ok(ty) => PyErr::from_type(ty, err.to_string()),
        Err(import_error) => import_error,
    }
}

/// Runs `f` without the GIL and converts its error.
pub fn detached<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    F: FnOnce() -> turnrl_core::Result<T> + Send,
    T: Send,
{
    py.detach(|| crate::fork::run(f))
        .map_err(|e| to_pyerr(py, e))
}
