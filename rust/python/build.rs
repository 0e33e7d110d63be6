// `cfg(Py_GIL_DISABLED)` for free-threaded interpreters, where reading
// Python objects without holding references is not sound (src/args.rs).
fn main() {
    pyo3_build_config::use_pyo3_cfgs();
}
