//! Serde types for FAL's JSON, written to tolerate what FAL may add or change:
//! unknown fields are ignored, unknown enum strings are kept in `Other`, and model
//! payloads stay `serde_json::Value` (seeds can exceed `i64`, schemas vary per model).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Declares a string enum that keeps unknown spellings instead of failing the parse:
/// FAL has added statuses before, and a poller must not choke on a new one.
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($variant,)+
            Other(String),
        }

        impl $name {
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)+
                    Self::Other(s) => s,
                }
            }

            pub fn parse(s: &str) -> Self {
                match s {
                    $($text => Self::$variant,)+
                    other => Self::Other(other.to_owned()),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Ok(Self::parse(&s))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// Queue vocabulary (status endpoint). FAL has no FAILED/CANCELLED: failures are
    /// `COMPLETED` with an error result.
    QueueState {
        InQueue = "IN_QUEUE",
        InProgress = "IN_PROGRESS",
        Completed = "COMPLETED",
    }
);

string_enum!(
    /// Webhook vocabulary (differs from the queue's).
    CallbackStatus {
        Ok = "OK",
        Error = "ERROR",
    }
);

string_enum!(
    /// Body of a cancel answer. `OK` is listed by FAL's docs with no stated meaning.
    CancelStatus {
        CancellationRequested = "CANCELLATION_REQUESTED",
        AlreadyCompleted = "ALREADY_COMPLETED",
        NotFound = "NOT_FOUND",
        Ok = "OK",
    }
);

/// Answer to a queue submit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubmitResponse {
    pub request_id: String,
    #[serde(default)]
    pub status_url: Option<String>,
    #[serde(default)]
    pub response_url: Option<String>,
    #[serde(default)]
    pub cancel_url: Option<String>,
    #[serde(default)]
    pub queue_position: Option<u64>,
    #[serde(default)]
    pub gateway_request_id: Option<String>,
}

/// Answer of the status endpoint (and each SSE event of the status stream).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueStatus {
    pub status: QueueState,
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(default)]
    pub response_url: Option<String>,
    #[serde(default)]
    pub status_url: Option<String>,
    #[serde(default)]
    pub cancel_url: Option<String>,
    #[serde(default)]
    pub queue_position: Option<u64>,
    #[serde(default)]
    pub logs: Option<Vec<LogEntry>>,
    #[serde(default)]
    pub metrics: Option<Value>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub error: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub error_type: Option<String>,
}

/// One log line. Documented with level/source, observed with only timestamp, message and
/// labels: every field is optional and non-string scalars are stringified.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LogEntry {
    #[serde(default, deserialize_with = "lenient_string")]
    pub message: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub level: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub source: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub timestamp: Option<String>,
    #[serde(default)]
    pub labels: Option<Value>,
}

/// Body of a webhook delivery. Parse it only after the signature checked the raw bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallbackBody {
    pub request_id: String,
    #[serde(default)]
    pub gateway_request_id: Option<String>,
    pub status: CallbackStatus,
    #[serde(default)]
    pub payload: Option<Value>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub error: Option<String>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub payload_error: Option<String>,
}

/// Answer of the cancel endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelResponse {
    pub status: CancelStatus,
}

/// Answer of `POST /storage/upload/initiate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadInitiateResponse {
    pub upload_url: String,
    pub file_url: String,
}

/// FAL's error body: `{"detail": [..]}` (pydantic-style list) or `{"detail": "text"}`,
/// optionally with `error_type` (infrastructure errors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    #[serde(default)]
    pub detail: Option<Detail>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub error_type: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Detail {
    Message(String),
    Items(Vec<DetailItem>),
    /// Anything else FAL may send; kept verbatim.
    Other(Value),
}

/// One validation error. `msg` is for humans; FAL says not to parse it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetailItem {
    #[serde(default)]
    pub loc: Vec<Value>,
    #[serde(default, deserialize_with = "lenient_string")]
    pub msg: Option<String>,
    #[serde(default, rename = "type", deserialize_with = "lenient_string")]
    pub kind: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl ErrorDetail {
    /// Parses an error body; `None` when it is not JSON or has neither field.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let parsed: Self = serde_json::from_slice(body).ok()?;
        (parsed.detail.is_some() || parsed.error_type.is_some()).then_some(parsed)
    }

    /// One line for humans, e.g. `body.num_images: Input should be ≤ 4`.
    pub fn summary(&self) -> String {
        match &self.detail {
            Some(Detail::Message(m)) => m.clone(),
            Some(Detail::Items(items)) => items
                .iter()
                .map(|i| {
                    let loc = i
                        .loc
                        .iter()
                        .map(|v| match v {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(".");
                    format!("{loc}: {}", i.msg.as_deref().unwrap_or("invalid"))
                })
                .collect::<Vec<_>>()
                .join("; "),
            Some(Detail::Other(v)) => v.to_string(),
            None => self.error_type.clone().unwrap_or_default(),
        }
    }
}

/// Accepts a string, null, or any other scalar (stringified) so that one odd field never
/// fails a whole status or callback parse.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    })
}

/// Serializes like Python's `json.dumps(obj, sort_keys=True)` with default separators
/// (`", "`, `": "`) and `ensure_ascii=True`. FAL builds webhook bodies this way; the
/// emulator must produce byte-identical bodies so signatures are computed over the same
/// layout as the real service.
pub fn python_json(value: &Value) -> String {
    let mut out = String::new();
    write_py(value, &mut out);
    out
}

fn write_py(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(f) = n.as_f64() {
                out.push_str(&python_float_repr(f));
            } else {
                // Only reachable with serde_json's arbitrary_precision; its text is exact.
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => write_py_str(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Python sorts str keys by code point; UTF-8 byte order is the same order.
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_py_str(key, out);
                out.push_str(": ");
                write_py(&map[key], out);
            }
            out.push('}');
        }
    }
}

fn write_py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            // Python's ensure_ascii escapes everything outside ' '..='~' (DEL included).
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, positional when the decimal
/// exponent is in `-4..16`, else `d.ddde±XX`; integral values keep `.0`.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "-1.25e-5".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.push_str(&"0".repeat(int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.push_str(&"0".repeat((-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.abs()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GOLDEN_BODY: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fal-webhook-golden/body.json"
    );

    #[test]
    fn python_json_reproduces_the_golden_body_byte_for_byte() {
        let raw = std::fs::read(GOLDEN_BODY).expect("golden body fixture");
        assert_eq!(raw.len(), 564);
        let value: Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(python_json(&value).as_bytes(), raw.as_slice());
    }

    #[test]
    fn python_json_escapes_like_ensure_ascii() {
        let v = json!({"b": "é\u{1F600}\"\\\n\t\u{7f}\u{01}", "a": [1, -2, true, null]});
        assert_eq!(
            python_json(&v),
            r#"{"a": [1, -2, true, null], "b": "\u00e9\ud83d\ude00\"\\\n\t\u007f\u0001"}"#
        );
        assert_eq!(python_json(&json!({})), "{}");
        assert_eq!(python_json(&json!([])), "[]");
    }

    #[test]
    fn python_float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.5, "1.5"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e22, "1.2345e+22"),
            (123.456, "123.456"),
            (1.3716533930000878, "1.3716533930000878"),
            (2.107286686077714, "2.107286686077714"),
            (1e300, "1e+300"),
        ];
        for (f, want) in cases {
            assert_eq!(python_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn seeds_above_i64_survive() {
        let body = br#"{"seed": 17454220438242315174}"#;
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["seed"].as_u64(), Some(17454220438242315174));
        assert_eq!(python_json(&v).as_bytes(), body);
    }

    #[test]
    fn status_parses_tolerantly() {
        let s: QueueStatus = serde_json::from_str(
            r#"{"status":"IN_PROGRESS","request_id":"r","logs":[{"timestamp":"2024-12-20T15:37:17.120314","message":"hi","labels":{}},{"level":3}],"metrics":{},"new_field":1}"#,
        )
        .unwrap();
        assert_eq!(s.status, QueueState::InProgress);
        let logs = s.logs.unwrap();
        assert_eq!(logs[0].message.as_deref(), Some("hi"));
        assert_eq!(logs[1].level.as_deref(), Some("3"));

        let s: QueueStatus = serde_json::from_str(r#"{"status":"PAUSED"}"#).unwrap();
        assert_eq!(s.status, QueueState::Other("PAUSED".into()));

        let s: QueueStatus = serde_json::from_str(
            r#"{"status":"COMPLETED","logs":null,"metrics":{"inference_time":1.5},"error":"Request timed out","error_type":"request_timeout"}"#,
        )
        .unwrap();
        assert_eq!(s.status, QueueState::Completed);
        assert_eq!(s.error_type.as_deref(), Some("request_timeout"));
    }

    #[test]
    fn submit_response_ignores_extra_fields() {
        let s: SubmitResponse = serde_json::from_str(
            r#"{"status":"IN_QUEUE","request_id":"019e","response_url":"u","status_url":"s","cancel_url":"c","logs":null,"metrics":{},"queue_position":0}"#,
        )
        .unwrap();
        assert_eq!(s.request_id, "019e");
        assert_eq!(s.queue_position, Some(0));
        assert_eq!(s.gateway_request_id, None);
    }

    #[test]
    fn callback_bodies_parse() {
        let raw = std::fs::read(GOLDEN_BODY).unwrap();
        let cb: CallbackBody = serde_json::from_slice(&raw).unwrap();
        assert_eq!(cb.status, CallbackStatus::Ok);
        assert_eq!(cb.error, None);
        assert!(cb.payload.unwrap()["images"].is_array());

        let cb: CallbackBody = serde_json::from_str(
            r#"{"request_id": "x", "gateway_request_id": "x", "status": "ERROR", "error": "Invalid status code: 422", "payload": {"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]}}"#,
        )
        .unwrap();
        assert_eq!(cb.status, CallbackStatus::Error);
        let detail: ErrorDetail = serde_json::from_value(cb.payload.unwrap()).unwrap();
        assert_eq!(detail.summary(), "body.prompt: field required");

        let cb: CallbackBody = serde_json::from_str(
            r#"{"request_id": "x", "status": "WEIRD", "payload": null, "payload_error": "not serializable"}"#,
        )
        .unwrap();
        assert_eq!(cb.status, CallbackStatus::Other("WEIRD".into()));
    }

    #[test]
    fn error_detail_both_shapes() {
        let d = ErrorDetail::parse(br#"{"detail": "Request is still in progress"}"#).unwrap();
        assert_eq!(
            d.detail,
            Some(Detail::Message("Request is still in progress".into()))
        );
        let d = ErrorDetail::parse(
            br#"{"detail": [{"loc": ["body", "num_images"], "msg": "too big", "type": "less_than_equal", "ctx": {"le": 4}}]}"#,
        )
        .unwrap();
        match d.detail {
            Some(Detail::Items(items)) => {
                assert_eq!(items[0].kind.as_deref(), Some("less_than_equal"));
                assert_eq!(items[0].extra["ctx"], json!({"le": 4}));
            }
            other => panic!("unexpected {other:?}"),
        }
        let d = ErrorDetail::parse(
            br#"{"detail": "Request timed out", "error_type": "request_timeout"}"#,
        )
        .unwrap();
        assert_eq!(d.error_type.as_deref(), Some("request_timeout"));
        assert!(ErrorDetail::parse(b"<html>nginx</html>").is_none());
        assert!(ErrorDetail::parse(b"{}").is_none());
    }

    #[test]
    fn cancel_statuses() {
        for (text, want) in [
            (
                "CANCELLATION_REQUESTED",
                CancelStatus::CancellationRequested,
            ),
            ("ALREADY_COMPLETED", CancelStatus::AlreadyCompleted),
            ("NOT_FOUND", CancelStatus::NotFound),
            ("OK", CancelStatus::Ok),
            ("NEW", CancelStatus::Other("NEW".into())),
        ] {
            let r: CancelResponse =
                serde_json::from_str(&format!(r#"{{"status": "{text}"}}"#)).unwrap();
            assert_eq!(r.status, want);
        }
    }
}
