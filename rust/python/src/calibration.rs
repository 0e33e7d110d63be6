use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1};
use pyo3::prelude::*;
use turnrl_core::calibration::{self as cal, TierSums, Variable};

use crate::errors::detached;

fn to_i64(values: Vec<u64>) -> Vec<i64> {
    values.into_iter().map(|v| v as i64).collect()
}

fn to_u64(values: &[i64], field: &str) -> PyResult<Vec<u64>> {
    values
        .iter()
        .map(|&v| u64::try_from(v))
        .collect::<Result<_, _>>()
        .map_err(|_| pyo3::exceptions::PyValueError::new_err(format!("{field} has a negative sum")))
}

type SumArrays<'py> = (
    u64,
    u64,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
);

/// Additive per-tier sums of a ragged batch: (trajectories, successes,
/// present, present_success, turns, turns_sq, turns_success).
#[pyfunction]
#[pyo3(signature = (outcome, turn_offsets, turn_tiers, n_tiers, success_threshold=1.0))]
pub fn tier_sums<'py>(
    py: Python<'py>,
    outcome: PyReadonlyArray1<'py, f64>,
    turn_offsets: PyReadonlyArray1<'py, i64>,
    turn_tiers: PyReadonlyArray1<'py, i64>,
    n_tiers: usize,
    success_threshold: f64,
) -> PyResult<SumArrays<'py>> {
    let outcome = outcome.as_slice()?;
    let turn_offsets = turn_offsets.as_slice()?;
    let turn_tiers = turn_tiers.as_slice()?;
    let sums = detached(py, || {
        let mut sums = TierSums::new(n_tiers);
        sums.accumulate(outcome, turn_offsets, turn_tiers, success_threshold)?;
        Ok(sums)
    })?;
    Ok((
        sums.trajectories,
        sums.successes,
        to_i64(sums.present).into_pyarray(py),
        to_i64(sums.present_success).into_pyarray(py),
        to_i64(sums.turns).into_pyarray(py),
        to_i64(sums.turns_sq).into_pyarray(py),
        to_i64(sums.turns_success).into_pyarray(py),
    ))
}

/// Point-biserial correlations from tier sums: a [tiers, 4] array of
/// (r, p_value, ci_low, ci_high).
#[pyfunction]
#[pyo3(signature = (trajectories, successes, present, present_success, turns, turns_sq, turns_success, *, variable="presence", confidence=0.95))]
#[allow(clippy::too_many_arguments)]
pub fn tier_correlations<'py>(
    py: Python<'py>,
    trajectories: u64,
    successes: u64,
    present: PyReadonlyArray1<'py, i64>,
    present_success: PyReadonlyArray1<'py, i64>,
    turns: PyReadonlyArray1<'py, i64>,
    turns_sq: PyReadonlyArray1<'py, i64>,
    turns_success: PyReadonlyArray1<'py, i64>,
    variable: &str,
    confidence: f64,
) -> PyResult<Bound<'py, PyArray2<f64>>> {
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "confidence must be in (0, 1), got {confidence}"
        )));
    }
    let sums = TierSums {
        trajectories,
        successes,
        present: to_u64(present.as_slice()?, "present")?,
        present_success: to_u64(present_success.as_slice()?, "present_success")?,
        turns: to_u64(turns.as_slice()?, "turns")?,
        turns_sq: to_u64(turns_sq.as_slice()?, "turns_sq")?,
        turns_success: to_u64(turns_success.as_slice()?, "turns_success")?,
    };
    let tiers = sums.tiers();
    for (name, len) in [
        ("present_success", sums.present_success.len()),
        ("turns", sums.turns.len()),
        ("turns_sq", sums.turns_sq.len()),
        ("turns_success", sums.turns_success.len()),
    ] {
        if len != tiers {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{name} has {len} tiers but present has {tiers}"
            )));
        }
    }
    let rows = detached(py, || {
        let variable = Variable::from_name(variable)?;
        Ok((0..tiers)
            .flat_map(|t| {
                let c = sums.correlation(t, variable, confidence);
                [c.r, c.p_value, c.ci_low, c.ci_high]
            })
            .collect::<Vec<f64>>())
    })?;
    numpy::PyArrayMethods::reshape(&rows.into_pyarray(py), [tiers, 4])
}

type DirectionArrays<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<f64>>,
);

/// Per tier: (turns, misaligned turns, mean advantage; 0 within the
/// zero tolerance of the batch's largest |advantage|).
#[pyfunction]
pub fn direction_check<'py>(
    py: Python<'py>,
    advantages: PyReadonlyArray1<'py, f64>,
    turn_tiers: PyReadonlyArray1<'py, i64>,
    signs: PyReadonlyArray1<'py, i8>,
) -> PyResult<DirectionArrays<'py>> {
    let advantages = advantages.as_slice()?;
    let turn_tiers = turn_tiers.as_slice()?;
    let signs = signs.as_slice()?;
    let d = detached(py, || cal::direction_check(advantages, turn_tiers, signs))?;
    Ok((
        to_i64(d.turns).into_pyarray(py),
        to_i64(d.misaligned).into_pyarray(py),
        d.mean_advantage.into_pyarray(py),
    ))
}
