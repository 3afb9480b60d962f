//! Where FAL's calls go: an endpoint's queue URL, the URLs of one request, a multipart
//! upload's parts. Every path segment is checked, since these URLs carry our key.

use reqwest::Url;

use super::error::{FalError, FalErrorKind};

/// `{base}/{endpoint}` with the endpoint checked segment by segment: it becomes a path,
/// and `..` or a `?` would point the key-bearing request somewhere unintended.
pub fn endpoint_url(base: &Url, endpoint: &str) -> Result<Url, FalError> {
    let endpoint = endpoint.trim_matches('/');
    let valid = !endpoint.is_empty()
        && endpoint.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
        });
    if !valid {
        return Err(FalError::new(
            FalErrorKind::InvalidUrl,
            format!("invalid endpoint id {endpoint:?}"),
        ));
    }
    let joined = format!("{}/{endpoint}", base.as_str().trim_end_matches('/'));
    Url::parse(&joined).map_err(|e| FalError::new(FalErrorKind::InvalidUrl, e.to_string()))
}

/// The owner/alias part of an endpoint id (three segments for `workflows`/`comfy`):
/// FAL's status/result/cancel URLs live under it, not under the full id.
pub fn app_prefix(endpoint: &str) -> String {
    let parts: Vec<&str> = endpoint
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let n = if matches!(parts.first(), Some(&"workflows" | &"comfy")) {
        3
    } else {
        2
    };
    parts[..n.min(parts.len())].join("/")
}

/// `{queue_base}/{owner}/{alias}/requests`. The URLs a submit returns are used where known;
/// these are built only for a request whose submit answer was lost.
pub fn requests_base(queue_base: &Url, endpoint: &str) -> String {
    format!(
        "{}/{}/requests",
        queue_base.as_str().trim_end_matches('/'),
        app_prefix(endpoint)
    )
}

/// Where to ask FAL about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestUrls {
    pub status: String,
    pub response: String,
    pub cancel: String,
}

/// `{origin}{path}/{segment}{query}` of a multipart upload URL: where its parts and its
/// completion go.
pub(super) fn upload_part_url(upload_url: &Url, segment: &str) -> Url {
    let mut url = upload_url.clone();
    let path = format!("{}/{segment}", upload_url.path().trim_end_matches('/'));
    url.set_path(&path);
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls() {
        let base = Url::parse("https://queue.fal.run/").unwrap();
        assert_eq!(
            endpoint_url(&base, "fal-ai/flux-pro/v1.1-ultra-finetuned")
                .unwrap()
                .as_str(),
            "https://queue.fal.run/fal-ai/flux-pro/v1.1-ultra-finetuned"
        );
        let prefixed = Url::parse("http://127.0.0.1:9/fal").unwrap();
        assert_eq!(
            endpoint_url(&prefixed, "/fal-ai/flux-lora/")
                .unwrap()
                .as_str(),
            "http://127.0.0.1:9/fal/fal-ai/flux-lora"
        );
        for bad in [
            "", "/", "a/../b", "a//b", "a/b?x=1", "a/b#f", "a b/c", "a/%2e%2e",
        ] {
            assert!(endpoint_url(&base, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes() {
        assert_eq!(
            app_prefix("fal-ai/flux-pro/v1.1-ultra-finetuned"),
            "fal-ai/flux-pro"
        );
        assert_eq!(app_prefix("fal-ai/flux-lora"), "fal-ai/flux-lora");
        assert_eq!(app_prefix("workflows/me/flow/x"), "workflows/me/flow");
        assert_eq!(app_prefix("comfy/me/flow"), "comfy/me/flow");
        let base = Url::parse("https://queue.fal.run/").unwrap();
        assert_eq!(
            requests_base(&base, "fal-ai/flux-pro/v1.1-ultra-finetuned"),
            "https://queue.fal.run/fal-ai/flux-pro/requests"
        );
    }
}
