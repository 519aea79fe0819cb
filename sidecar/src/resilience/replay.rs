//! A request body that can be sent again: it streams to the first try as it arrives and
//! keeps a copy, up to a limit, for the tries after it.
//!
//! Buffering the whole body before the first try would be simpler, but it holds back
//! every request until its client has finished sending, and a streaming call that waits
//! for the server's first message before sending more (gRPC client or bidi streaming, a
//! slow upload) would hang. Streaming and recording at once is what linkerd2-proxy does
//! for the same reason; this is a smaller version of the idea, written for our one body
//! type.
//!
//! All copies share one state. The copy that is sent first reads the client's body and
//! records each data frame; a later copy replays the record, then continues reading the
//! client's body where the earlier one stopped, if it had not finished. That hand-over
//! needs the earlier copy to be gone (dropped when its try failed), so [`Replay::can_replay`]
//! says whether a retry is possible right now: the body was read to its end within the
//! limit, or nobody holds the rest of it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};

use crate::body::{Body, BoxError};

#[derive(Default)]
struct State {
    /// Data frames read so far, while within the limit.
    recorded: Vec<Bytes>,
    recorded_len: usize,
    trailers: Option<HeaderMap>,
    /// The client's body ended within the limit: the record is the whole body.
    complete: bool,
    /// The body went over the limit or failed: no copy can be sent again.
    spoiled: bool,
    /// The unread rest of the client's body, when no copy is reading it.
    rest: Option<Body>,
}

/// The shared state of a request body's copies.
#[derive(Clone)]
pub struct Replay {
    state: Arc<Mutex<State>>,
    limit: usize,
    hint: SizeHint,
}

impl Replay {
    /// Takes over `body`, recording at most `limit` bytes of it.
    pub fn new(body: Body, limit: usize) -> Self {
        let hint = body.size_hint();
        let spoiled = hint.lower() > limit as u64;
        let complete = body.is_end_stream();
        let state = State { complete, spoiled, rest: Some(body), ..Default::default() };
        Self { state: Arc::new(Mutex::new(state)), limit, hint }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new copy of the body, from its start.
    pub fn body(&self) -> ReplayBody {
        ReplayBody { replay: self.clone(), next: 0, reading: None, trailers_sent: false }
    }

    /// Whether another copy could be sent in full now.
    pub fn can_replay(&self) -> bool {
        let s = self.lock();
        !s.spoiled && (s.complete || s.rest.is_some())
    }
}

/// One copy of a request body.
pub struct ReplayBody {
    replay: Replay,
    /// The next recorded frame to send.
    next: usize,
    /// The client's body, while this copy is the one reading it.
    reading: Option<Body>,
    trailers_sent: bool,
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(rest) = self.reading.take() {
            self.replay.lock().rest = Some(rest);
        }
    }
}

impl http_body::Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        {
            let mut s = this.replay.lock();
            if this.reading.is_none() {
                if let Some(chunk) = s.recorded.get(this.next) {
                    this.next += 1;
                    return Poll::Ready(Some(Ok(Frame::data(chunk.clone()))));
                }
                if s.complete {
                    return match s.trailers.clone().filter(|_| !this.trailers_sent) {
                        Some(t) => {
                            this.trailers_sent = true;
                            Poll::Ready(Some(Ok(Frame::trailers(t))))
                        }
                        None => Poll::Ready(None),
                    };
                }
                match s.rest.take() {
                    Some(rest) => this.reading = Some(rest),
                    None => {
                        return Poll::Ready(Some(Err(
                            "the request body is still held by a previous try and cannot be replayed".into(),
                        )));
                    }
                }
            }
        }
        let Some(reading) = this.reading.as_mut() else { return Poll::Ready(None) };
        let polled = std::task::ready!(Pin::new(reading).poll_frame(cx));
        let mut s = this.replay.lock();
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if !s.spoiled && s.recorded_len + data.len() <= this.replay.limit {
                        s.recorded_len += data.len();
                        s.recorded.push(data.clone());
                        this.next = s.recorded.len();
                    } else if !s.spoiled {
                        s.spoiled = true;
                        s.recorded = Vec::new();
                    }
                } else if let Some(t) = frame.trailers_ref() {
                    s.trailers = Some(t.clone());
                    this.trailers_sent = true;
                    s.complete = !s.spoiled;
                }
            }
            Some(Err(_)) => s.spoiled = true,
            None => s.complete = !s.spoiled,
        }
        if s.complete {
            // Read to the end: later copies replay the record alone.
            this.reading = None;
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        let s = self.replay.lock();
        self.reading.is_none()
            && s.complete
            && self.next >= s.recorded.len()
            && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        // Every copy sends the whole body from its start.
        self.replay.hint
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::body;

    fn chunks(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))).collect();
        body::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(frames)))
    }

    #[tokio::test]
    async fn a_copy_replays_what_the_first_read() {
        let replay = Replay::new(chunks(&["ab", "cd"]), 16);
        let first = replay.body().collect().await.expect("first").to_bytes();
        assert_eq!(first, "abcd");
        assert!(replay.can_replay());
        let second = replay.body().collect().await.expect("second").to_bytes();
        assert_eq!(second, "abcd");
    }

    #[tokio::test]
    async fn an_unread_body_passes_to_the_next_copy() {
        let replay = Replay::new(chunks(&["ab", "cd"]), 16);
        // The first try failed before sending anything (a connect failure).
        drop(replay.body());
        assert!(replay.can_replay());
        assert_eq!(replay.body().collect().await.expect("second").to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn a_partly_read_body_is_replayed_then_continued() {
        let replay = Replay::new(chunks(&["ab", "cd", "ef"]), 16);
        let mut first = replay.body();
        let frame = first.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().expect("data"), "ab");
        assert!(!replay.can_replay(), "the first copy still holds the rest");
        drop(first);
        assert!(replay.can_replay());
        assert_eq!(replay.body().collect().await.expect("second").to_bytes(), "abcdef");
    }

    #[tokio::test]
    async fn over_the_limit_streams_whole_but_cannot_replay() {
        let replay = Replay::new(chunks(&["abcd", "efgh"]), 6);
        assert_eq!(replay.body().collect().await.expect("first").to_bytes(), "abcdefgh");
        assert!(!replay.can_replay());
    }

    #[tokio::test]
    async fn a_known_length_over_the_limit_is_never_recorded() {
        let replay = Replay::new(body::full("0123456789"), 4);
        assert!(!replay.can_replay());
        assert_eq!(replay.body().size_hint().exact(), Some(10));
    }
}
