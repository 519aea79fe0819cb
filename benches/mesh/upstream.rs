//! The one upstream every scenario talks to, in the harness process: an HTTP/1.1 + HTTP/2
//! server (hyper, one thread) answering 1 KiB, gRPC unary calls with a 1 KiB message and
//! `grpc-status: 0` trailers, and a TCP sink counting bytes for the opaque-stream test.

use std::convert::Infallible;
use std::io::Read;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// Size of every response body (the 1 KiB responses).
pub const RESPONSE_BYTES: usize = 1024;

type UpBody = BoxBody<Bytes, Infallible>;

pub struct Upstream {
    /// HTTP/1.1 and HTTP/2 (prior knowledge), gRPC included.
    pub http: SocketAddr,
    /// Opaque TCP sink.
    pub tcp: SocketAddr,
    sunk: Arc<AtomicU64>,
}

impl Upstream {
    /// Starts both servers on their own threads; they live as long as the process.
    pub fn start() -> std::io::Result<Self> {
        let http_listener = StdListener::bind("127.0.0.1:0")?;
        http_listener.set_nonblocking(true)?;
        let http = http_listener.local_addr()?;
        std::thread::Builder::new().name("upstream-http".into()).spawn(move || {
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("upstream runtime");
            rt.block_on(serve_http(http_listener));
        })?;
        let tcp_listener = StdListener::bind("127.0.0.1:0")?;
        let tcp = tcp_listener.local_addr()?;
        let sunk = Arc::new(AtomicU64::new(0));
        let counter = sunk.clone();
        std::thread::Builder::new().name("upstream-tcp".into()).spawn(move || {
            for stream in tcp_listener.incoming().flatten() {
                let counter = counter.clone();
                std::thread::spawn(move || sink(stream, &counter));
            }
        })?;
        Ok(Self { http, tcp, sunk })
    }

    /// Bytes the TCP sink has received so far.
    pub fn sunk(&self) -> u64 {
        self.sunk.load(Ordering::Relaxed)
    }
}

fn sink(mut stream: std::net::TcpStream, counter: &AtomicU64) {
    let mut buf = vec![0u8; 256 * 1024];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

async fn serve_http(listener: StdListener) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("upstream listener");
    let body = Bytes::from(vec![b'x'; RESPONSE_BYTES]);
    let mut grpc = Vec::with_capacity(5 + RESPONSE_BYTES);
    grpc.push(0);
    grpc.extend_from_slice(&(RESPONSE_BYTES as u32).to_be_bytes());
    grpc.extend_from_slice(&body);
    let grpc = Bytes::from(grpc);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let (body, grpc) = (body.clone(), grpc.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| respond(req, body.clone(), grpc.clone()));
            let _ =
                auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

async fn respond(req: Request<Incoming>, body: Bytes, grpc: Bytes) -> Result<Response<UpBody>, Infallible> {
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    // Read the request to its end, as a real server does.
    let mut incoming = req.into_body();
    while let Some(Ok(_)) = incoming.frame().await {}
    if is_grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frames: [Result<Frame<Bytes>, Infallible>; 2] =
            [Ok(Frame::data(grpc)), Ok(Frame::trailers(trailers))];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let mut resp = Response::new(BodyExt::boxed(body));
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        Ok(resp)
    } else {
        Ok(Response::new(Full::new(body).boxed()))
    }
}
