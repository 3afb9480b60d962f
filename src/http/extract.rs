//! Extractors that turn every malformed request into a problem document: axum's own rejections
//! are plain text, and a client of this API should never have to parse two error formats.

use crate::error::{ApiError, FieldError};
use crate::state::AppState;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use utoipa::openapi::Required;
use utoipa::openapi::path::ParameterIn;
use utoipa::{IntoParams, PartialSchema};

/// A JSON body, parsed into `T` with per-field errors, and kept in canonical form (sorted keys,
/// no insignificant whitespace) for idempotency fingerprints.
pub struct ApiJson<T> {
    pub value: T,
    pub canonical: Vec<u8>,
}

/// Rules of a request body that span fields (one of two fields, say). They are checked on the
/// raw object whether or not its fields parsed, so that they are reported with every other
/// wrong field of the body.
/// Rules that depend on the server's configuration (an allow-list, a batch limit) are checked
/// here too, with the state at hand.
pub trait AcrossFields {
    fn across_fields(
        _body: &serde_json::Map<String, serde_json::Value>,
        _state: &AppState,
    ) -> Vec<FieldError> {
        Vec::new()
    }
}

impl<T> FromRequest<AppState> for ApiJson<T>
where
    T: DeserializeOwned + PartialSchema + AcrossFields,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|mime| {
                let mime = mime.trim().to_ascii_lowercase();
                mime == "application/json" || mime.ends_with("+json")
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "the body must be JSON, sent with `Content-Type: application/json`".into(),
            ));
        }
        let limit = crate::http::body_limit_of(&req);
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|err| body_read_error(&err, limit))?;
        parse_json(&bytes, |body| T::across_fields(body, state))
    }
}

/// Why a request body could not be read: over `limit` is a 413; anything else (a broken chunked
/// encoding, a connection that ended early) is a malformed request, and the client must not be
/// told to send less.
pub fn body_read_error(err: &axum::Error, limit: usize) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = cause {
        if current.is::<http_body_util::LengthLimitError>() {
            return ApiError::PayloadTooLarge { limit };
        }
        cause = current.source();
    }
    ApiError::BadRequest(format!("the request body could not be read: {err}"))
}

/// Parses a JSON object into `T`, naming every field that is wrong.
pub fn parse_json<T: DeserializeOwned + PartialSchema>(
    bytes: &[u8],
    across_fields: impl FnOnce(&serde_json::Map<String, serde_json::Value>) -> Vec<FieldError>,
) -> Result<ApiJson<T>, ApiError> {
    let raw: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
    // serde would also read a struct from an array of its fields in order; a body of this API is
    // always an object, so anything else is refused before it can be misread.
    let Some(object) = raw.as_object() else {
        return Err(ApiError::validation("body", "must be a JSON object"));
    };
    // JSON text can only carry a NUL escaped, so a body without `\u0000` needs no walk.
    let may_hold_nul = bytes.windows(6).any(|six| six == b"\\u0000");
    if let Some(path) = may_hold_nul.then(|| nul_in(&raw, String::new())).flatten() {
        // PostgreSQL cannot store U+0000 in JSON; refusing it everywhere keeps both backends alike.
        return Err(ApiError::validation(
            if path.is_empty() {
                "body".to_owned()
            } else {
                path
            },
            "text may not contain the NUL character (\\u0000)",
        ));
    }
    let canonical = serde_json::to_vec(&raw).map_err(ApiError::internal)?;
    let across = across_fields(object);
    if across.is_empty() {
        // The usual case: the parsed body moves into `T` instead of being copied.
        return match serde_path_to_error::deserialize(raw) {
            Ok(value) => Ok(ApiJson { value, canonical }),
            Err(first) => {
                let raw: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
                    ApiError::BadRequest(format!("the body is not valid JSON: {e}"))
                })?;
                Err(every_field_error::<T>(&raw, &first, across))
            }
        };
    }
    match serde_path_to_error::deserialize::<_, T>(&raw) {
        Ok(_) => Err(ApiError::Validation(across)),
        Err(first) => Err(every_field_error::<T>(&raw, &first, across)),
    }
}

/// Every wrong field of `raw` (an object) that `T` refuses, one by one, with the rules across
/// fields after them; `first` is the error of parsing the whole, said when no field alone is
/// wrong.
fn every_field_error<T: DeserializeOwned + PartialSchema>(
    raw: &serde_json::Value,
    first: &serde_path_to_error::Error<serde_json::Error>,
    across: Vec<FieldError>,
) -> ApiError {
    let entries: Vec<(String, serde_json::Value)> = raw
        .as_object()
        .into_iter()
        .flatten()
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let errors = body_fields::<T>()
        .map(|fields| {
            every_error(&entries, &fields, |entry| {
                let one = serde_json::Value::Object(std::iter::once(entry).collect());
                serde_path_to_error::deserialize::<_, T>(&one)
                    .map(drop)
                    .map_err(|err| Refusal::of(&err))
            })
        })
        .unwrap_or_default();
    let mut errors = if errors.is_empty() {
        vec![Refusal::of(first).into_field_error("body")]
    } else {
        errors
    };
    for error in across {
        if !errors.iter().any(|known| known.field == error.field) {
            errors.push(error);
        }
    }
    ApiError::Validation(errors)
}

/// The fields a request type takes, and those it cannot do without, as its schema declares
/// them (the schema follows serde's names, `Option`s and defaults).
struct FieldSet {
    names: Vec<String>,
    required: Vec<String>,
}

fn body_fields<T: PartialSchema>() -> Option<FieldSet> {
    use utoipa::openapi::{RefOr, Schema};
    match T::schema() {
        RefOr::T(Schema::Object(object)) => Some(FieldSet {
            names: object.properties.keys().cloned().collect(),
            required: object.required,
        }),
        _ => None,
    }
}

fn query_fields<T: IntoParams>() -> FieldSet {
    let params = T::into_params(|| Some(ParameterIn::Query));
    FieldSet {
        required: params
            .iter()
            .filter(|p| matches!(p.required, Required::True))
            .map(|p| p.name.clone())
            .collect(),
        names: params.into_iter().map(|p| p.name).collect(),
    }
}

/// One deserialization error: where (the top-level field, and the full path) and why.
struct Refusal {
    field: Option<String>,
    path: String,
    message: String,
}

impl Refusal {
    fn of<E: std::fmt::Display>(err: &serde_path_to_error::Error<E>) -> Self {
        let field = match err.path().iter().next() {
            Some(serde_path_to_error::Segment::Map { key }) => Some(key.clone()),
            _ => None,
        };
        Self {
            field,
            path: err.path().to_string(),
            message: clean_serde_message(err.inner()),
        }
    }

    fn into_field_error(self, whole: &str) -> FieldError {
        let field = if self.path == "." {
            whole.to_owned()
        } else {
            self.path
        };
        FieldError::new(field, self.message)
    }
}

/// Every wrong field of a request that failed to parse, each under its own name: serde stops at
/// the first, so each given field is parsed again on its own (a field alone is refused only for
/// its own sake, or for the fields it lacks, which are told apart by the path), and the fields
/// the type requires are checked for presence by name.
fn every_error<V: Clone>(
    entries: &[(String, V)],
    fields: &FieldSet,
    probe: impl Fn((String, V)) -> Result<(), Refusal>,
) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (key, value) in entries {
        // A body of many thousand bad keys must not buy a far larger answer, nor as many parses.
        if errors.len() >= MAX_REPORTED {
            break;
        }
        if !seen.insert(key.as_str()) {
            errors.push(FieldError::new(key.clone(), "is given more than once"));
            continue;
        }
        let Err(refusal) = probe((key.clone(), value.clone())) else {
            continue;
        };
        if !fields.names.contains(key) {
            // A type that ignores unknown fields is refused here only for what it lacks.
            if refusal.message.starts_with("unknown field") {
                errors.push(FieldError::new(key.clone(), refusal.message));
            }
        } else if refusal.field.as_deref() == Some(key.as_str()) {
            errors.push(refusal.into_field_error(key));
        }
    }
    for name in &fields.required {
        if !seen.contains(name.as_str()) {
            errors.push(FieldError::new(name.clone(), "is required"));
        }
    }
    errors.truncate(MAX_REPORTED);
    errors
}

/// The most field errors one answer lists.
const MAX_REPORTED: usize = 50;

/// The path of the first string or key holding U+0000, if any.
fn nul_in(value: &serde_json::Value, path: String) -> Option<String> {
    use serde_json::Value;
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match value {
        Value::String(s) if s.contains('\0') => Some(path),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_in(item, format!("{path}[{i}]"))),
        Value::Object(fields) => fields.iter().find_map(|(key, item)| {
            if key.contains('\0') {
                Some(join("<key>"))
            } else {
                nul_in(item, join(key))
            }
        }),
        _ => None,
    }
}

/// serde's messages end with a position that means nothing once the body is a `Value`.
fn clean_serde_message(err: &impl std::fmt::Display) -> String {
    let message = err.to_string();
    match message.find(" at line ") {
        Some(cut) => message[..cut].to_owned(),
        None => message,
    }
}

/// Query parameters, parsed into `T` with every wrong parameter named.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned + IntoParams,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        parse_query(query).map(ApiQuery)
    }
}

/// Parses a query string into `T`, naming every parameter that is wrong.
pub fn parse_query<T: DeserializeOwned + IntoParams>(query: &str) -> Result<T, ApiError> {
    let deserializer =
        serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    let first = match serde_path_to_error::deserialize(deserializer) {
        Ok(value) => return Ok(value),
        Err(first) => first,
    };
    let entries: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(key, value)| (key.into_owned(), value.into_owned()))
        .collect();
    let errors = every_error(&entries, &query_fields::<T>(), |(key, value)| {
        let one = form_urlencoded::Serializer::new(String::new())
            .append_pair(&key, &value)
            .finish();
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(one.as_bytes()));
        serde_path_to_error::deserialize::<_, T>(deserializer)
            .map(drop)
            .map_err(|err| Refusal::of(&err))
    });
    Err(ApiError::Validation(if errors.is_empty() {
        vec![Refusal::of(&first).into_field_error("query")]
    } else {
        errors
    }))
}

/// The UUID path parameter `name`; anything else is a 422 naming the parameter.
pub fn path_id(params: &axum::extract::RawPathParams, name: &str) -> Result<uuid::Uuid, ApiError> {
    let value = params
        .iter()
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
        .ok_or_else(|| ApiError::internal(format!("route without `{name}`")))?;
    uuid::Uuid::parse_str(value)
        .map_err(|_| ApiError::validation(name, format!("`{value}` is not a valid id (a UUID)")))
}

/// A path whose parameters are not even text (`%FF`): no id, like any other that is not a UUID.
fn not_utf8(name: &str) -> ApiError {
    ApiError::validation(
        name,
        "is not a valid id (a UUID): it is not even valid UTF-8",
    )
}

/// An avatar's photo: `/v1/avatars/{id}/photos/{photo_id}`.
pub struct PhotoPath {
    pub avatar: uuid::Uuid,
    pub photo: uuid::Uuid,
}

impl<S: Send + Sync> FromRequestParts<S> for PhotoPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let params = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| not_utf8("id"))?;
        Ok(Self {
            avatar: path_id(&params, "id")?,
            photo: path_id(&params, "photo_id")?,
        })
    }
}

/// A route's one UUID path parameter; anything else is a 422 naming the parameter.
pub struct ApiPathId(pub uuid::Uuid);

impl<S: Send + Sync> FromRequestParts<S> for ApiPathId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let params = axum::extract::RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| not_utf8("id"))?;
        let name = params
            .iter()
            .next()
            .map(|(name, _)| name.to_owned())
            .ok_or_else(|| ApiError::internal("route without a path parameter"))?;
        path_id(&params, &name).map(ApiPathId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, utoipa::ToSchema, IntoParams)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Strict {
        name: String,
        count: u32,
        tags: Option<Vec<u8>>,
        #[serde(default)]
        flag: bool,
    }

    #[derive(Debug, Deserialize, utoipa::ToSchema, IntoParams)]
    #[allow(dead_code)]
    struct Lenient {
        token: String,
        page: Option<u32>,
    }

    fn named(err: ApiError) -> Vec<(String, String)> {
        match err {
            ApiError::Validation(errors) => {
                errors.into_iter().map(|e| (e.field, e.message)).collect()
            }
            other => panic!("not a validation error: {other:?}"),
        }
    }

    #[test]
    fn a_body_names_each_wrong_unknown_and_missing_field() {
        let err = parse_json::<Strict>(br#"{"count": "x", "tags": [1, 300], "extra": 1}"#, |_| {
            Vec::new()
        })
        .err()
        .unwrap();
        let errors = named(err);
        let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["count", "extra", "tags[1]", "name"], "{errors:?}");
        assert_eq!(errors[3].1, "is required");
        assert!(errors[1].1.starts_with("unknown field"), "{errors:?}");
        assert!(parse_json::<Strict>(br#"{"name": "a", "count": 1}"#, |_| Vec::new()).is_ok());
        // Optional and defaulted fields are never said to be missing.
        let errors = named(
            parse_json::<Strict>(br#"{"name": 1}"#, |_| Vec::new())
                .err()
                .unwrap(),
        );
        assert_eq!(
            errors.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(),
            ["name", "count"]
        );
    }

    #[test]
    fn a_body_of_countless_bad_keys_gets_a_bounded_answer() {
        let keys: serde_json::Map<String, serde_json::Value> = (0..10_000)
            .map(|n| (format!("k{n}"), serde_json::Value::Null))
            .collect();
        let body = serde_json::to_vec(&keys).unwrap();
        let errors = named(parse_json::<Strict>(&body, |_| Vec::new()).err().unwrap());
        assert_eq!(errors.len(), MAX_REPORTED);
    }

    #[test]
    fn a_query_names_each_wrong_repeated_and_missing_parameter() {
        let errors = named(
            parse_query::<Strict>("count=x&count=2&colour=red")
                .err()
                .unwrap(),
        );
        let fields: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["count", "count", "colour", "name"], "{errors:?}");
        assert_eq!(errors[1].1, "is given more than once");
        // A type that ignores unknown parameters is refused only for what is wrong or missing.
        let errors = named(parse_query::<Lenient>("page=x&other=1").err().unwrap());
        assert_eq!(
            errors,
            [
                ("page".to_owned(), errors[0].1.clone()),
                ("token".to_owned(), "is required".to_owned())
            ]
        );
        assert!(parse_query::<Lenient>("token=t&other=1").is_ok());
    }
}
