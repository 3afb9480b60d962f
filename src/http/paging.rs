//! Keyset pagination over time-ordered (UUIDv7) ids, newest first: the page size rule and the
//! opaque cursors every list endpoint shares.

use crate::error::{ApiError, ApiResult, FieldError};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use uuid::Uuid;

const MAX_PAGE: u32 = 100;
pub const DEFAULT_PAGE: u32 = 20;

/// A query's `limit`, checked while the query is parsed so that it is reported along with the
/// query's other errors.
pub fn page_limit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let limit = <Option<u32> as serde::Deserialize>::deserialize(d)?;
    match limit {
        Some(limit) if !(1..=MAX_PAGE).contains(&limit) => Err(serde::de::Error::custom(format!(
            "must be between 1 and {MAX_PAGE}"
        ))),
        _ => Ok(limit),
    }
}

/// The prefix of the cursors of `GET /v1/jobs`.
pub const JOBS: &str = "j1:";
/// The prefix of the cursors of `GET /v1/avatars`.
pub const AVATARS: &str = "a1:";

const NOT_A_CURSOR: &str = "is not a cursor this API gave out";

fn decode(prefix: &str, cursor: &str) -> Option<Uuid> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| {
            text.strip_prefix(prefix)
                .and_then(|id| Uuid::parse_str(id).ok())
        })
}

fn cursor_of<'de, D: serde::Deserializer<'de>>(
    prefix: &str,
    d: D,
) -> Result<Option<String>, D::Error> {
    let cursor = <Option<String> as serde::Deserialize>::deserialize(d)?;
    match &cursor {
        Some(given) if decode(prefix, given).is_none() => {
            Err(serde::de::Error::custom(NOT_A_CURSOR))
        }
        _ => Ok(cursor),
    }
}

/// A `cursor` of the jobs list, checked while the query is parsed.
pub fn job_cursor<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    cursor_of(JOBS, d)
}

/// A `cursor` of the avatars list, checked while the query is parsed.
pub fn avatar_cursor<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    cursor_of(AVATARS, d)
}

/// One page request: how many items, after which id. `prefix` ties a cursor to its list, so a
/// cursor of one list is refused by another.
pub struct Keyset {
    pub limit: u32,
    pub after: Option<Uuid>,
    prefix: &'static str,
}

impl Keyset {
    pub fn parse(
        prefix: &'static str,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> ApiResult<Self> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        let mut errors = Vec::new();
        if !(1..=MAX_PAGE).contains(&limit) {
            errors.push(FieldError::new(
                "limit",
                format!("must be between 1 and {MAX_PAGE}"),
            ));
        }
        let after = cursor.and_then(|cursor| {
            let id = decode(prefix, cursor);
            if id.is_none() {
                errors.push(FieldError::new("cursor", NOT_A_CURSOR));
            }
            id
        });
        if !errors.is_empty() {
            return Err(ApiError::Validation(errors));
        }
        Ok(Self {
            limit,
            after,
            prefix,
        })
    }

    /// How many rows to fetch: one more than asked tells whether another page exists.
    pub fn fetch_limit(&self) -> u32 {
        self.limit + 1
    }

    /// The page out of the fetched rows, and the cursor of the next page if there is one.
    pub fn page<T>(&self, mut rows: Vec<T>, id: impl Fn(&T) -> Uuid) -> (Vec<T>, Option<String>) {
        if rows.len() <= self.limit as usize {
            return (rows, None);
        }
        rows.truncate(self.limit as usize);
        let next = rows.last().map(|row| self.cursor(id(row)));
        (rows, next)
    }

    fn cursor(&self, id: Uuid) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}{id}", self.prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_belong_to_their_list() {
        let id = Uuid::now_v7();
        let jobs = Keyset::parse("j1:", None, None).unwrap();
        let cursor = jobs.cursor(id);
        assert_eq!(
            Keyset::parse("j1:", None, Some(&cursor)).unwrap().after,
            Some(id)
        );
        assert!(Keyset::parse("a1:", None, Some(&cursor)).is_err());
        assert!(Keyset::parse("j1:", None, Some("not-a-cursor")).is_err());
        assert!(Keyset::parse("j1:", None, Some(&URL_SAFE_NO_PAD.encode(id.to_string()))).is_err());
        assert!(Keyset::parse("j1:", Some(0), None).is_err());
        assert!(Keyset::parse("j1:", Some(101), None).is_err());
        let (rows, next) = Keyset::parse("j1:", Some(2), None)
            .unwrap()
            .page(vec![1, 2, 3], |_| id);
        assert_eq!((rows, next.is_some()), (vec![1, 2], true));
    }
}
