//! PyO3 bindings of turnrl-core, imported as `turnrl._core`.
//!
//! Each function borrows numpy buffers without copying, releases the GIL for
//! the work, and maps core errors onto `turnrl.exceptions`.

mod advantages;
mod args;
mod buffer;
mod calibration;
mod errors;
mod fork;
mod keys;
mod parse;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
mod _core {
    #[pymodule_export]
    use crate::advantages::{broadcast_to_tokens, compute_advantages, estimators, validate_batch};
    #[pymodule_export]
    use crate::calibration::{direction_check, tier_correlations, tier_sums};
    #[pymodule_export]
    use crate::parse::{parse_tool_calls, parse_tool_calls_batch, ParsedMessage};

    #[pymodule_export]
    use crate::args::{
        compare_args, compare_args_batch, label_tiers, normalize_args, ArgComparison, TierLabels,
    };
    #[pymodule_export]
    use crate::buffer::{
        check_rollout_line, read_rollouts, ReadProgress, RolloutFileWriter, RolloutLineReader,
    };

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        crate::fork::register();
        m.add("__version__", env!("CARGO_PKG_VERSION"))
    }
}
