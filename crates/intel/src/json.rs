//! Decoding helpers shared by the providers' wire modules.

use enrichd_core::ProviderError;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::client::short;

/// Parses a body as JSON. Never echoes the body: only serde's position-style reason.
pub(crate) fn parse(body: &[u8]) -> Result<Value, ProviderError> {
    let mut value: Value = serde_json::from_slice(body)
        .map_err(|e| ProviderError::Decode(short(&format!("invalid json: {e}"))))?;
    strip_nul(&mut value);
    Ok(value)
}

/// Parses a body that must be a JSON object.
pub(crate) fn parse_object(body: &[u8]) -> Result<Value, ProviderError> {
    let value = parse(body)?;
    if value.is_object() {
        Ok(value)
    } else {
        Err(ProviderError::Decode(format!(
            "expected a json object, got {}",
            kind(&value)
        )))
    }
}

/// Deserialises a typed view of `value`; a wrong type is a decode error.
pub(crate) fn decode<T: DeserializeOwned>(value: &Value) -> Result<T, ProviderError> {
    T::deserialize(value).map_err(|e| ProviderError::Decode(short(&e.to_string())))
}

/// The JSON kind of a value, for decode reasons.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Removes NUL characters from every string (keys too): the stored raw bodies go into JSON
/// columns, and PostgreSQL refuses `\u0000` in text.
pub(crate) fn strip_nul(value: &mut Value) {
    match value {
        Value::String(s) if s.contains('\0') => s.retain(|c| c != '\0'),
        Value::Array(items) => items.iter_mut().for_each(strip_nul),
        Value::Object(map) => {
            if map.keys().any(|k| k.contains('\0')) {
                let entries = std::mem::take(map);
                for (k, v) in entries {
                    map.insert(k.replace('\0', ""), v);
                }
            }
            map.values_mut().for_each(strip_nul);
        }
        _ => {}
    }
}

/// An empty JSON object, the raw value of answers with no body worth keeping.
pub(crate) fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_nul_everywhere() {
        let mut v = serde_json::json!({"a\u{0}b": ["x\u{0}y", {"k": "\u{0}"}], "n": 1});
        strip_nul(&mut v);
        assert_eq!(v, serde_json::json!({"ab": ["xy", {"k": ""}], "n": 1}));
    }

    #[test]
    fn decode_reasons_never_echo_the_body() {
        let err = parse(b"<html>secret-looking page</html>").unwrap_err();
        assert!(matches!(err, ProviderError::Decode(_)));
        assert!(!err.to_string().contains("secret-looking"));
        let err = parse_object(b"[1,2]").unwrap_err();
        assert_eq!(
            err,
            ProviderError::Decode("expected a json object, got an array".into())
        );
    }
}
