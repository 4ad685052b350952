//! Trigger parameters (SPEC §2.3 (v2)): the names a project lists in `params`, taken from a
//! trigger's query string and its body, checked, and made part of the build's target.
//!
//! The query string is decoded as `application/x-www-form-urlencoded` by `form_urlencoded`
//! (`%XX` escapes and `+` for a space, as browsers and `curl --data-urlencode -G` send it).
//! From a body: a hook's JSON-object body gives its top-level string, number and boolean
//! members (other bodies give nothing: a CMS payload is not a parameter list); an API
//! trigger's `params` object gives its members, and there a member of another type is an
//! error. The query string wins. Names the project does not list are ignored. A value
//! longer than [`MAX_VALUE_BYTES`] or holding a NUL, CR or LF is refused: values reach the
//! build as environment variables (never through a shell), and a line break in one is how
//! a header or log line would be forged downstream.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::model::Params;

/// Longest parameter value, in bytes.
pub const MAX_VALUE_BYTES: usize = 256;

/// Why parameters were refused (400, code 1400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A value is too long.
    #[error("parameter {0:?} is longer than 256 bytes")]
    TooLong(String),
    /// A value holds a NUL, CR or LF.
    #[error("parameter {0:?} must not contain a NUL, CR or LF")]
    BadByte(String),
    /// An API `params` member is not a string, number or boolean.
    #[error("parameter {0:?} must be a string, number or boolean")]
    BadType(String),
    /// The API `params` member is not an object.
    #[error("field \"params\" must be a JSON object of names and values")]
    NotAnObject,
    /// The query string is not valid UTF-8 once decoded.
    #[error("the query string's parameter {0:?} is not valid UTF-8")]
    NotUtf8(String),
}

fn check(name: &str, value: String) -> Result<String, ParamError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(ParamError::TooLong(name.to_owned()));
    }
    if value.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n')) {
        return Err(ParamError::BadByte(name.to_owned()));
    }
    Ok(value)
}

/// A JSON scalar as parameter text: strings as they are, numbers and booleans as their JSON
/// text (`3`, `true`); anything else `None`.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Parameters of the query string (`None`: no query) for a project listing `allowed`.
pub fn from_query(allowed: &BTreeSet<String>, query: Option<&str>) -> Result<Params, ParamError> {
    let mut out = Params::new();
    if allowed.is_empty() {
        return Ok(out);
    }
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if !allowed.contains(k.as_ref()) {
            continue;
        }
        // `form_urlencoded` replaces invalid UTF-8 with U+FFFD; that is a changed value, so
        // it is refused instead of passed on.
        if v.contains('\u{FFFD}') {
            return Err(ParamError::NotUtf8(k.into_owned()));
        }
        let value = check(&k, v.into_owned())?;
        out.insert(k.into_owned(), value);
    }
    Ok(out)
}

/// Parameters of a hook's body: its top-level scalar members, if it is a JSON object.
pub fn from_hook_body(allowed: &BTreeSet<String>, body: &[u8]) -> Result<Params, ParamError> {
    let mut out = Params::new();
    if allowed.is_empty() || !body.trim_ascii_start().starts_with(b"{") {
        return Ok(out);
    }
    let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(body) else {
        return Ok(out);
    };
    for name in allowed {
        if let Some(v) = m.get(name).and_then(scalar) {
            out.insert(name.clone(), check(name, v)?);
        }
    }
    Ok(out)
}

/// Parameters of an API trigger's `params` member (`None`: absent).
pub fn from_api(allowed: &BTreeSet<String>, params: Option<&Value>) -> Result<Params, ParamError> {
    let mut out = Params::new();
    let m: &Map<String, Value> = match params {
        None | Some(Value::Null) => return Ok(out),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(ParamError::NotAnObject),
    };
    for (name, v) in m {
        if !allowed.contains(name) {
            continue;
        }
        let value = scalar(v).ok_or_else(|| ParamError::BadType(name.clone()))?;
        out.insert(name.clone(), check(name, value)?);
    }
    Ok(out)
}

/// The body's parameters overridden by the query string's (SPEC §2.3: the query wins).
pub fn merge(body: Params, query: Params) -> Params {
    let mut out = body;
    out.extend(query);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn params(pairs: &[(&str, &str)]) -> Params {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_query_string_is_decoded_and_filtered() {
        let a = allowed(&["env", "msg"]);
        assert_eq!(
            from_query(&a, Some("env=prod&wait=5&msg=a%20b+c%26d&other=x")).unwrap(),
            params(&[("env", "prod"), ("msg", "a b c&d")])
        );
        assert_eq!(from_query(&a, None).unwrap(), Params::new());
        assert_eq!(
            from_query(&a, Some("env=")).unwrap(),
            params(&[("env", "")])
        );
        let long = format!("env={}", "x".repeat(257));
        for (query, refused) in [
            ("env=%0a", ParamError::BadByte("env".into())),
            ("env=a%0Db", ParamError::BadByte("env".into())),
            ("env=%00", ParamError::BadByte("env".into())),
            ("env=%ff", ParamError::NotUtf8("env".into())),
            (&long, ParamError::TooLong("env".into())),
        ] {
            assert_eq!(from_query(&a, Some(query)), Err(refused), "{query}");
        }
        assert!(from_query(&a, Some(&format!("env={}", "é".repeat(128)))).is_ok());
        // Unlisted names are ignored even when their values would be refused.
        assert_eq!(from_query(&a, Some("x=%0a")).unwrap(), Params::new());
    }

    #[test]
    fn hook_bodies_give_top_level_scalars_of_listed_names() {
        let a = allowed(&["env", "n", "flag", "obj"]);
        let body = br#"{"env": "prod", "n": 3, "flag": true, "obj": {"a": 1}, "x": "y"}"#;
        assert_eq!(
            from_hook_body(&a, body).unwrap(),
            params(&[("env", "prod"), ("n", "3"), ("flag", "true")])
        );
        assert_eq!(from_hook_body(&a, b"env=prod").unwrap(), Params::new());
        assert_eq!(from_hook_body(&a, b"[1]").unwrap(), Params::new());
        assert_eq!(from_hook_body(&a, b"{not json").unwrap(), Params::new());
        assert_eq!(
            from_hook_body(&a, br#"{"env": "a\nb"}"#),
            Err(ParamError::BadByte("env".into()))
        );
        // The query wins.
        let merged = merge(
            from_hook_body(&a, body).unwrap(),
            from_query(&a, Some("env=staging")).unwrap(),
        );
        assert_eq!(merged["env"], "staging");
        assert_eq!(merged["n"], "3");
    }

    #[test]
    fn api_params_must_be_an_object_of_scalars() {
        let a = allowed(&["env"]);
        let v: Value = serde_json::json!({"env": "prod", "other": 1});
        assert_eq!(from_api(&a, Some(&v)).unwrap(), params(&[("env", "prod")]));
        assert_eq!(from_api(&a, None).unwrap(), Params::new());
        assert_eq!(
            from_api(&a, Some(&serde_json::json!(["env"]))),
            Err(ParamError::NotAnObject)
        );
        assert_eq!(
            from_api(&a, Some(&serde_json::json!({"env": ["a"]}))),
            Err(ParamError::BadType("env".into()))
        );
        assert_eq!(
            from_api(&a, Some(&serde_json::json!({"env": 2.5}))).unwrap(),
            params(&[("env", "2.5")])
        );
        // Names not listed are ignored, whatever their type.
        assert_eq!(
            from_api(&a, Some(&serde_json::json!({"other": {"deep": 1}}))).unwrap(),
            Params::new()
        );
    }
}
