//! A body refused before it was read is read on for a moment before the refusal is sent.
//!
//! A request refused early (too large, not a form, no valid token) is usually still being sent.
//! If the server answers and closes at once, the client's unsent bytes meet a closed socket, the
//! kernel resets the connection, and most clients report a broken connection instead of the 4xx
//! that explains it. So, as nginx's lingering close does, the rest of such a body is read and
//! thrown away, up to a small amount and a short time, before the answer goes out. Bodies far
//! larger than that are not waited for: their client gets the reset it asked for. A client that
//! waits for `100 Continue` has sent nothing yet, and is not invited to.

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;

/// The most of a refused body read and thrown away.
const DRAIN_BYTES: usize = 1 << 20;
/// The longest a refusal waits for its body.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Middleware: after a 4xx, reads what is left of the request's body (within the bounds above)
/// before answering.
pub async fn drain_refused_bodies(request: Request, next: Next) -> Response {
    if request.headers().contains_key(header::EXPECT) {
        return next.run(request).await;
    }
    let (back, mut returned) = oneshot::channel();
    let request = request.map(|body| {
        Body::new(ReturnedOnDrop {
            inner: Some(body),
            back: Some(back),
        })
    });
    let response = next.run(request).await;
    if response.status().is_client_error()
        && let Ok(mut rest) = returned.try_recv()
    {
        let drain = async {
            let mut read = 0;
            while read < DRAIN_BYTES {
                match rest.frame().await {
                    Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
                    Some(Err(_)) | None => break,
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
    }
    response
}

/// The request's body, handed back to the middleware when the handler lets go of it unread.
struct ReturnedOnDrop {
    inner: Option<Body>,
    back: Option<oneshot::Sender<Body>>,
}

impl HttpBody for ReturnedOnDrop {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.get_mut().inner.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint)
    }
}

impl Drop for ReturnedOnDrop {
    fn drop(&mut self) {
        if let (Some(body), Some(back)) = (self.inner.take(), self.back.take())
            && !body.is_end_stream()
        {
            let _ = back.send(body);
        }
    }
}
