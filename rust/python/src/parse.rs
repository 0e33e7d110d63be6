//! Bindings of `turnrl_core::parse`: one message, or many in parallel with
//! the GIL released.

use std::cell::{Cell, RefCell};

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyFloat, PyList, PyString};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use turnrl_core::parse::{self as core, Arguments, Format, ParamType, ToolSchemas};
use turnrl_core::Error;

use crate::errors::{detached, to_pyerr};
use crate::keys::key;

/// Below this many bytes one message parses faster than the GIL round trip.
const DETACH_MIN_BYTES: usize = 16 * 1024;

/// The parts of one assistant message (see `turnrl.parse_tool_calls`).
///
/// Python objects are built on first access of each attribute and cached, so
/// a caller that reads only `.tool_calls` or `.errors` pays for nothing else.
/// JSON arguments stay text in the message (which this object keeps alive)
/// until `.tool_calls` is read, and are then decoded straight into Python
/// objects.
#[pyclass(frozen, module = "turnrl._core", name = "ParsedMessage")]
pub struct ParsedMessage {
    text: PyBackedStr,
    parsed: core::SpannedMessage,
    content: PyOnceLock<Py<PyString>>,
    reasoning: PyOnceLock<Option<Py<PyString>>>,
    tool_calls: PyOnceLock<Py<PyList>>,
    errors: PyOnceLock<Py<PyList>>,
    error_offsets: PyOnceLock<Py<PyList>>,
    call_offsets: PyOnceLock<Py<PyList>>,
}

impl ParsedMessage {
    fn new(text: PyBackedStr, parsed: core::SpannedMessage) -> Self {
        Self {
            text,
            parsed,
            content: PyOnceLock::new(),
            reasoning: PyOnceLock::new(),
            tool_calls: PyOnceLock::new(),
            errors: PyOnceLock::new(),
            error_offsets: PyOnceLock::new(),
            call_offsets: PyOnceLock::new(),
        }
    }
}

#[pymethods]
impl ParsedMessage {
    // The spans in `parsed` come from parsing `text` itself, so `Text::get`
    // finds them; `unwrap_or_default` below never applies.

    /// Text outside reasoning and calls, trimmed.
    #[getter]
    fn content<'py>(&self, py: Python<'py>) -> Bound<'py, PyString> {
        self.content
            .get_or_init(py, || {
                PyString::new(py, self.parsed.content.get(&self.text).unwrap_or_default()).unbind()
            })
            .bind(py)
            .clone()
    }

    /// `<think>` text, or None when the message has none.
    #[getter]
    fn reasoning<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyString>> {
        self.reasoning
            .get_or_init(py, || {
                self.parsed
                    .reasoning
                    .as_ref()
                    .map(|r| PyString::new(py, r.get(&self.text).unwrap_or_default()).unbind())
            })
            .as_ref()
            .map(|r| r.bind(py).clone())
    }

    /// `[{"name": str, "arguments": dict}, ...]`, in order.
    #[getter]
    fn tool_calls<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = self.tool_calls.get_or_try_init(py, || -> PyResult<_> {
            let list = PyList::empty(py);
            for call in &self.parsed.tool_calls {
                let d = PyDict::new(py);
                d.set_item(pyo3::intern!(py, "name"), key(py, &call.name))?;
                let arguments = match &call.arguments {
                    Arguments::Json(span) => {
                        let json = self.text.get(span.clone()).ok_or_else(|| {
                            to_pyerr(
                                py,
                                Error::invalid(format!(
                                    "arguments span {span:?} is outside the message"
                                )),
                            )
                        })?;
                        json_to_py(py, json)?
                    }
                    Arguments::Encoded(json) => json_to_py(py, json)?,
                    Arguments::Built(map) => map_to_py(py, map)?.into_any(),
                };
                d.set_item(pyo3::intern!(py, "arguments"), arguments)?;
                list.append(d)?;
            }
            Ok(list.unbind())
        })?;
        Ok(list.bind(py).clone())
    }

    /// One message per call that could not be read.
    #[getter]
    fn errors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = self.errors.get_or_try_init(py, || -> PyResult<_> {
            let list = PyList::empty(py);
            for e in &self.parsed.errors {
                list.append(e.to_string())?;
            }
            Ok(list.unbind())
        })?;
        Ok(list.bind(py).clone())
    }

    /// Byte offset in the input of each failed call's opening tag.
    #[getter]
    fn error_offsets<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = self.error_offsets.get_or_try_init(py, || -> PyResult<_> {
            let list = PyList::empty(py);
            for e in &self.parsed.errors {
                list.append(e.offset)?;
            }
            Ok(list.unbind())
        })?;
        Ok(list.bind(py).clone())
    }

    /// Byte offset in the input of each parsed call's opening tag: with
    /// `error_offsets`, the order in which the message wrote its calls.
    #[getter]
    fn call_offsets<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = self.call_offsets.get_or_try_init(py, || -> PyResult<_> {
            let list = PyList::empty(py);
            for call in &self.parsed.tool_calls {
                list.append(call.offset)?;
            }
            Ok(list.unbind())
        })?;
        Ok(list.bind(py).clone())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "ParsedMessage(content={}, reasoning={}, tool_calls={}, errors={})",
            self.content(py).repr()?,
            match self.reasoning(py) {
                Some(r) => r.repr()?.to_string(),
                None => "None".to_string(),
            },
            self.tool_calls(py)?.repr()?,
            self.errors(py)?.repr()?,
        ))
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<ParsedMessage>() {
            Ok(other) => {
                // Offsets say where, not what: they take no part.
                let other = other.get();
                let (a, b) = (&self.parsed, &other.parsed);
                a.content.get(&self.text) == b.content.get(&other.text)
                    && a.reasoning.as_ref().map(|r| r.get(&self.text))
                        == b.reasoning.as_ref().map(|r| r.get(&other.text))
                    && a.errors == b.errors
                    && a.tool_calls.len() == b.tool_calls.len()
                    && a.tool_calls.iter().zip(&b.tool_calls).all(|(x, y)| {
                        x.name == y.name
                            && match (
                                x.arguments.to_map(&self.text),
                                y.arguments.to_map(&other.text),
                            ) {
                                (Ok(p), Ok(q)) => p == q,
                                _ => false,
                            }
                    })
            }
            Err(_) => false,
        }
    }

    /// The message as a plain dict (content, reasoning, tool_calls, errors,
    /// error_offsets, call_offsets).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("content", self.content(py))?;
        d.set_item("reasoning", self.reasoning(py))?;
        d.set_item("tool_calls", self.tool_calls(py)?)?;
        d.set_item("errors", self.errors(py)?)?;
        d.set_item("error_offsets", self.error_offsets(py)?)?;
        d.set_item("call_offsets", self.call_offsets(py)?)?;
        Ok(d)
    }
}

/// serde_json value -> Python object (ints stay ints, floats stay floats).
pub(crate) fn value_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into_pyobject(py)?.into_any()
            } else if let Some(u) = n.as_u64() {
                u.into_pyobject(py)?.into_any()
            } else {
                PyFloat::new(py, n.as_f64().unwrap_or(f64::NAN)).into_any()
            }
        }
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(value_to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => map_to_py(py, map)?.into_any(),
    })
}

fn map_to_py<'py>(
    py: Python<'py>,
    map: &serde_json::Map<String, Value>,
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (k, v) in map {
        dict.set_item(key(py, k), value_to_py(py, v)?)?;
    }
    Ok(dict)
}

/// JSON text (checked by the parser) -> Python objects, built as serde_json
/// reads it: the types of [`value_to_py`], except that an integer beyond 64
/// bits stays an exact int (serde_json reads it as a float).
fn json_to_py<'py>(py: Python<'py>, json: &str) -> PyResult<Bound<'py, PyAny>> {
    let failure = RefCell::new(None);
    let maybe_big_int = Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(json);
    let built = PyJson {
        py,
        failure: &failure,
        maybe_big_int: &maybe_big_int,
    }
    .deserialize(&mut de);
    match built {
        // Rare: the text is read again by Python's json module, whose ints
        // are exact (`turnrl.parsing._loads_exact`).
        Ok(_) if maybe_big_int.get() => {
            static LOADS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
            LOADS
                .import(py, "turnrl.parsing", "_loads_exact")?
                .call1((json,))
        }
        Ok(obj) => Ok(obj),
        Err(e) => Err(failure
            .into_inner()
            .unwrap_or_else(|| to_pyerr(py, Error::invalid(format!("arguments: {e}"))))),
    }
}

/// Builds one JSON value as a Python object; a Python error met on the way
/// is kept in `failure` (serde's error type cannot carry it).
#[derive(Clone, Copy)]
struct PyJson<'py, 'f> {
    py: Python<'py>,
    failure: &'f RefCell<Option<PyErr>>,
    /// Set on an integral float of 2^63 or more: it may have been an
    /// integer literal too long for 64 bits.
    maybe_big_int: &'f Cell<bool>,
}

impl PyJson<'_, '_> {
    fn fail<E: de::Error>(&self, err: PyErr) -> E {
        let message = err.to_string();
        *self.failure.borrow_mut() = Some(err);
        E::custom(message)
    }
}

impl<'de, 'py> DeserializeSeed<'de> for PyJson<'py, '_> {
    type Value = Bound<'py, PyAny>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, 'py> Visitor<'de> for PyJson<'py, '_> {
    type Value = Bound<'py, PyAny>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
        Ok(PyBool::new(self.py, b).to_owned().into_any())
    }

    fn visit_i64<E: de::Error>(self, i: i64) -> Result<Self::Value, E> {
        let Ok(int) = i.into_pyobject(self.py);
        Ok(int.into_any())
    }

    fn visit_u64<E: de::Error>(self, u: u64) -> Result<Self::Value, E> {
        let Ok(int) = u.into_pyobject(self.py);
        Ok(int.into_any())
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<Self::Value, E> {
        if x.abs() >= 9.2e18 && x.fract() == 0.0 {
            self.maybe_big_int.set(true);
        }
        Ok(PyFloat::new(self.py, x).into_any())
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(PyString::new(self.py, s).into_any())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(self.py.None().into_bound(self.py))
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        let list = PyList::empty(self.py);
        while let Some(item) = seq.next_element_seed(self)? {
            list.append(item).map_err(|e| self.fail(e))?;
        }
        Ok(list.into_any())
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let dict = PyDict::new(self.py);
        while let Some(key) = map.next_key_seed(PyKey(self.py))? {
            let value = map.next_value_seed(self)?;
            dict.set_item(key, value).map_err(|e| self.fail(e))?;
        }
        Ok(dict.into_any())
    }
}

/// Builds an object key through the key cache ([`crate::keys`]).
struct PyKey<'py>(Python<'py>);

impl<'de, 'py> DeserializeSeed<'de> for PyKey<'py> {
    type Value = Bound<'py, PyString>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, 'py> Visitor<'de> for PyKey<'py> {
    type Value = Bound<'py, PyString>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(key(self.0, s))
    }
}

fn message_to_py(
    py: Python<'_>,
    text: PyBackedStr,
    m: core::SpannedMessage,
) -> PyResult<Py<ParsedMessage>> {
    Py::new(py, ParsedMessage::new(text, m))
}

/// OpenAI function schemas (`{"type": "function", "function": {...}}` or the
/// inner dict) -> parameter types per tool.
fn read_tools(py: Python<'_>, tools: &Bound<'_, PyAny>) -> PyResult<ToolSchemas> {
    let mut schemas = ToolSchemas::new();
    for (i, tool) in tools.try_iter()?.enumerate() {
        let tool = tool?;
        let bad = |what: &str| to_pyerr(py, Error::invalid(format!("tools[{i}]: {what}")));
        let tool = tool
            .cast::<PyDict>()
            .map_err(|_| bad("expected a dict (OpenAI function schema)"))?;
        let function = match tool.get_item("function")? {
            Some(f) => f
                .cast_into::<PyDict>()
                .map_err(|_| bad("\"function\" is not a dict"))?,
            None => tool.clone(),
        };
        let name: String = function
            .get_item("name")?
            .and_then(|n| n.extract().ok())
            .ok_or_else(|| bad("no string \"name\""))?;
        schemas.add_tool(&name);
        let Some(params) = function.get_item("parameters")? else {
            continue;
        };
        let Ok(params) = params.cast_into::<PyDict>() else {
            return Err(bad("\"parameters\" is not a dict"));
        };
        let Some(props) = params.get_item("properties")? else {
            continue;
        };
        let Ok(props) = props.cast_into::<PyDict>() else {
            return Err(bad("\"parameters.properties\" is not a dict"));
        };
        for (key, spec) in props.iter() {
            let key: String = key
                .extract()
                .map_err(|_| bad("a property name is not a string"))?;
            let spec = spec.cast::<PyDict>().ok();
            let ty = match spec {
                Some(spec) => spec.get_item("type")?,
                None => None,
            };
            let types: Vec<ParamType> = match ty {
                // No "type": the core reads anyOf/oneOf/enum/const from the
                // spec, converted as compare_args converts arguments (a spec
                // it cannot convert says nothing).
                None => match spec {
                    Some(spec)
                        if ["anyOf", "oneOf", "enum", "const"]
                            .iter()
                            .any(|k| spec.contains(*k).unwrap_or(false)) =>
                    {
                        crate::args::to_json(spec.as_any(), 0)
                            .map(|spec| core::types_of_spec(&spec))
                            .unwrap_or_default()
                    }
                    _ => vec![],
                },
                Some(t) => {
                    if let Ok(s) = t.extract::<String>() {
                        vec![ParamType::from_schema_name(&s)]
                    } else if let Ok(list) = t.extract::<Vec<String>>() {
                        list.iter()
                            .map(|s| ParamType::from_schema_name(s))
                            .collect()
                    } else {
                        return Err(PyTypeError::new_err(format!(
                            "tools[{i}]: type of parameter {key:?} must be a string or a list of strings"
                        )));
                    }
                }
            };
            schemas.set_param(&name, &key, types);
        }
    }
    Ok(schemas)
}

fn read_options(
    py: Python<'_>,
    fmt: &str,
    tools: Option<&Bound<'_, PyAny>>,
) -> PyResult<(Format, Option<ToolSchemas>)> {
    let format = Format::from_name(fmt).map_err(|e| to_pyerr(py, e))?;
    let schemas = match tools {
        Some(t) if !t.is_none() => Some(read_tools(py, t)?),
        _ => None,
    };
    Ok((format, schemas))
}

/// Parses one assistant message (see `turnrl.parse_tool_calls`).
#[pyfunction]
#[pyo3(signature = (text, fmt="auto", tools=None))]
pub fn parse_tool_calls(
    py: Python<'_>,
    text: PyBackedStr,
    fmt: &str,
    tools: Option<&Bound<'_, PyAny>>,
) -> PyResult<Py<ParsedMessage>> {
    let (format, schemas) = read_options(py, fmt, tools)?;
    let parsed = if text.len() >= DETACH_MIN_BYTES {
        detached(py, || {
            Ok(core::parse_tool_call_spans(&text, format, schemas.as_ref()))
        })?
    } else {
        core::parse_tool_call_spans(&text, format, schemas.as_ref())
    };
    message_to_py(py, text, parsed)
}

/// Parses many messages in parallel without the GIL (see
/// `turnrl.parse_tool_calls_batch`).
#[pyfunction]
#[pyo3(signature = (texts, fmt="auto", tools=None))]
pub fn parse_tool_calls_batch(
    py: Python<'_>,
    texts: Vec<PyBackedStr>,
    fmt: &str,
    tools: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<Py<ParsedMessage>>> {
    let (format, schemas) = read_options(py, fmt, tools)?;
    let parsed = detached(py, || {
        Ok(core::parse_tool_call_spans_batch(
            &texts,
            format,
            schemas.as_ref(),
        ))
    })?;
    texts
        .into_iter()
        .zip(parsed)
        .map(|(text, m)| message_to_py(py, text, m))
        .collect()
}
