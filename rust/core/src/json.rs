//! JSON text to [`serde_json::Value`], with every object key an ordinary key.
//!
//! The parser captures raw JSON text, which needs serde_json's `raw_value`
//! feature, and with that feature `Value`'s own decoder gives one key a
//! meaning JSON does not: an object whose first key is
//! `$serde_json::private::RawValue` must hold a string, which is parsed as
//! JSON and put in place of the object. So `{"$serde_json::private::RawValue":
//! "{\"name\": \"f\"}"}` would read as a tool call hidden inside a string.
//! `json.loads`, vLLM and every other JSON reader keep that key as a key;
//! so does this decoder. Everything else (numbers, repeated keys: the last
//! value at the first position, the nesting limit) is as `Value`'s.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Decodes one JSON value (surrounding whitespace allowed, nothing else).
pub fn value_from_str(text: &str) -> serde_json::Result<Value> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = PlainValue.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Decodes one JSON object.
pub fn map_from_str(text: &str) -> serde_json::Result<Map<String, Value>> {
    match value_from_str(text)? {
        Value::Object(map) => Ok(map),
        other => Err(de::Error::invalid_type(
            unexpected(&other),
            &"a JSON object",
        )),
    }
}

fn unexpected(value: &Value) -> de::Unexpected<'_> {
    match value {
        Value::Null => de::Unexpected::Unit,
        Value::Bool(b) => de::Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => de::Unexpected::Unsigned(u),
            (_, Some(i)) => de::Unexpected::Signed(i),
            _ => de::Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => de::Unexpected::Str(s),
        Value::Array(_) => de::Unexpected::Seq,
        Value::Object(_) => de::Unexpected::Map,
    }
}

#[derive(Clone, Copy)]
struct PlainValue;

impl<'de> DeserializeSeed<'de> for PlainValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PlainValue {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Number(i.into()))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(Value::Number(u.into()))
    }

    fn visit_f64<E>(self, x: f64) -> Result<Value, E> {
        // JSON text has no NaN or infinity; serde_json rejects overflow.
        Ok(Number::from_f64(x).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Value, S::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(PlainValue)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Value, M::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(PlainValue)?;
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAGIC: &str = "$serde_json::private::RawValue";

    #[test]
    fn the_raw_value_key_is_an_ordinary_key() {
        for text in [
            format!(r#"{{"{MAGIC}": "[1, 2]"}}"#),
            format!(r#"{{"{MAGIC}": 1, "a": 2}}"#),
            format!(r#"[{{"{MAGIC}": "{{\"name\": \"f\"}}"}}]"#),
        ] {
            let value = value_from_str(&text).expect("valid JSON");
            let first = match &value {
                Value::Array(items) => &items[0],
                v => v,
            };
            let map = first.as_object().expect("an object stays an object");
            assert!(map.contains_key(MAGIC), "{text}: {value}");
        }
    }

    fn json_text() -> impl Strategy<Value = String> {
        let part = proptest::sample::select(
            &[
                "{",
                "}",
                "[",
                "]",
                ":",
                ",",
                " ",
                "\"a\"",
                "\"b\"",
                "\"\\u00e9\"",
                "\"\\ud800\"",
                "1",
                "-0",
                "2.5e3",
                "1e400",
                "18446744073709551616",
                "-9223372036854775809",
                "true",
                "null",
                "x",
            ][..],
        );
        prop_oneof![
            proptest::collection::vec(part.clone(), 0..20).prop_map(|p| p.concat()),
            proptest::collection::vec(part, 0..20)
                .prop_map(|p| format!("{{\"a\": [{}], \"a\": {{\"b\": 1}}}}", p.concat())),
        ]
    }

    proptest! {
        /// Without the one special key, the same results and the same
        /// failures as `Value`'s own decoder.
        #[test]
        fn equals_serde_json_value(text in json_text()) {
            let ours = value_from_str(&text);
            let theirs = serde_json::from_str::<Value>(&text);
            match (ours, theirs) {
                (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
                (Err(_), Err(_)) => {}
                (a, b) => prop_assert!(false, "{:?}: ours {:?}, serde_json {:?}", text, a, b),
            }
        }

        #[test]
        fn deep_nesting_fails_as_serde_json_does(levels in 100usize..140) {
            let text = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
            prop_assert_eq!(
                value_from_str(&text).is_ok(),
                serde_json::from_str::<Value>(&text).is_ok()
            );
        }
    }
}
