use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use turnrl_core::advantages::{self as adv, Batch, Norm, Params, TurnNorm};

use crate::errors::detached;

/// Per-turn advantages of a ragged batch (see `turnrl.compute_advantages`).
#[pyfunction]
#[pyo3(signature = (estimator, outcome, group, turn_rewards, turn_offsets, *, norm="std", eps=1e-6, gamma=None, lam=None, turn_norm="position"))]
#[allow(clippy::too_many_arguments)]
pub fn compute_advantages<'py>(
    py: Python<'py>,
    estimator: &str,
    outcome: PyReadonlyArray1<'py, f64>,
    group: PyReadonlyArray1<'py, i64>,
    turn_rewards: PyReadonlyArray1<'py, f64>,
    turn_offsets: PyReadonlyArray1<'py, i64>,
    norm: &str,
    eps: f64,
    gamma: Option<f64>,
    lam: Option<f64>,
    turn_norm: &str,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let batch = Batch {
        outcome: outcome.as_slice()?,
        group: group.as_slice()?,
        turn_rewards: turn_rewards.as_slice()?,
        turn_offsets: turn_offsets.as_slice()?,
    };
    let out = detached(py, || {
        let params = Params {
            norm: Norm::from_name(norm)?,
            eps,
            gamma,
            lam,
            turn_norm: TurnNorm::from_name(turn_norm)?,
        };
        adv::compute_advantages(estimator, &batch, &params)
    })?;
    Ok(out.into_pyarray(py))
}

/// Spreads turn advantages onto a [B, T] token grid.
#[pyfunction]
pub fn broadcast_to_tokens<'py>(
    py: Python<'py>,
    turn_adv: PyReadonlyArray1<'py, f64>,
    turn_offsets: PyReadonlyArray1<'py, i64>,
    token_turn: PyReadonlyArray2<'py, i64>,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    let (rows, cols) = (token_turn.shape()[0], token_turn.shape()[1]);
    let turn_adv = turn_adv.as_slice()?;
    let turn_offsets = turn_offsets.as_slice()?;
    let token_turn = token_turn.as_slice()?;
    let out = detached(py, || {
        adv::broadcast_to_tokens(turn_adv, turn_offsets, token_turn, rows, cols)
    })?;
    out.into_pyarray(py).reshape([rows, cols])
}

/// The built-in estimators as (name, summary) pairs.
#[pyfunction]
pub fn estimators() -> Vec<(&'static str, &'static str)> {
    adv::ESTIMATORS
        .iter()
        .map(|e| (e.name, e.summary))
        .collect()
}

/// Checks a ragged batch's layout and values; raises what compute_advantages would.
#[pyfunction]
pub fn validate_batch<'py>(
    py: Python<'py>,
    outcome: PyReadonlyArray1<'py, f64>,
    group: PyReadonlyArray1<'py, i64>,
    turn_rewards: PyReadonlyArray1<'py, f64>,
    turn_offsets: PyReadonlyArray1<'py, i64>,
) -> PyResult<()> {
    let batch = Batch {
        outcome: outcome.as_slice()?,
        group: group.as_slice()?,
        turn_rewards: turn_rewards.as_slice()?,
        turn_offsets: turn_offsets.as_slice()?,
    };
    detached(py, || batch.validate())
}
