"""OpenTelemetry OTLP trace receiver for Ballast end-to-end tests.

A real OTLP endpoint built from the published protobuf definitions (the
opentelemetry-proto package's generated trace_service_pb2 / _pb2_grpc):
  OTLP/gRPC  opentelemetry.proto.collector.trace.v1.TraceService/Export on
             127.0.0.1:--grpc-port (gzip request compression handled by grpcio)
  OTLP/HTTP  POST /v1/traces on 127.0.0.1:--http-port, Content-Type
             application/x-protobuf, body an ExportTraceServiceRequest (optionally
             Content-Encoding: gzip). Answers 200 with an empty serialized
             ExportTraceServiceResponse (application/x-protobuf); 400 for a body that
             does not parse, 404 for any other path, 405 for another method on
             /v1/traces, 415 for another content type or content encoding.
Port 0 picks a free port. Export requests are counted across both transports;
--fail-first N fails the first N of them (gRPC UNAVAILABLE, HTTP 503 with a
google.rpc.Status body and Retry-After: 0) without recording their spans.

Every received span is appended to --out as one JSON line, flushed at once:
  {"transport": "grpc"|"http", "request": N (1-based ordinal of the export request
   that carried it, counted over both transports), "resource": {attr: value},
   "scope": instrumentation scope name, "trace_id": 32 lowercase hex,
   "span_id": 16 hex, "parent_span_id": 16 hex or "", "name": str,
   "kind": "SERVER"|"CLIENT"|"INTERNAL"|"PRODUCER"|"CONSUMER"|"UNSPECIFIED",
   "start_ns": int, "end_ns": int, "attributes": {key: value},
   "status": {"code": "UNSET"|"OK"|"ERROR", "message": str},
   "events": [{"name": str, "attributes": {key: value}}], "flags": int}
Attribute values: string, bool, int, double as JSON scalars; arrays as lists;
key-value lists as objects; bytes as lowercase hex; an empty value as null.

Prints "READY grpc=<port> http=<port>" once both listen; exits on SIGTERM/SIGINT.
"""
import argparse
import gzip
import json
import signal
import sys
import threading
import zlib
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"

# google.rpc.Code values used in the OTLP/HTTP error bodies.
RPC_INVALID_ARGUMENT = 3
RPC_UNAVAILABLE = 14


def any_value(v):
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if which == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, which)


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def enum_name(enum, value, prefix):
    try:
        return enum.Name(value)[len(prefix):]
    except ValueError:
        return str(value)


def span_records(request, transport, ordinal):
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for span in ss.spans:
                yield {
                    "transport": transport,
                    "request": ordinal,
                    "resource": resource,
                    "scope": ss.scope.name,
                    "trace_id": span.trace_id.hex(),
                    "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(),
                    "name": span.name,
                    "kind": enum_name(trace_pb2.Span.SpanKind, span.kind, "SPAN_KIND_"),
                    "start_ns": span.start_time_unix_nano,
                    "end_ns": span.end_time_unix_nano,
                    "attributes": attributes(span.attributes),
                    "status": {
                        "code": enum_name(trace_pb2.Status.StatusCode, span.status.code, "STATUS_CODE_"),
                        "message": span.status.message,
                    },
                    "events": [{"name": e.name, "attributes": attributes(e.attributes)} for e in span.events],
                    "flags": span.flags,
                }


class Receiver:
    """The state both transports share: the request counter and the output file."""

    def __init__(self, out_path, fail_first):
        self.fail_first = fail_first
        self.requests = 0
        self.lock = threading.Lock()
        self.out = open(out_path, "a", encoding="utf-8")

    def export(self, request, transport):
        """Counts one export request; records its spans and returns True, or returns
        False when the request is one of the first --fail-first ones."""
        with self.lock:
            self.requests += 1
            ordinal = self.requests
            if ordinal <= self.fail_first:
                print(f"otlp_receiver: failing export request {ordinal} ({transport}) "
                      f"as told by --fail-first {self.fail_first}", file=sys.stderr, flush=True)
                return False
            if self.out.closed:  # shutting down
                return True
            for record in span_records(request, transport, ordinal):
                self.out.write(json.dumps(record, separators=(",", ":")) + "\n")
                self.out.flush()
            return True

    def close(self):
        with self.lock:
            self.out.close()


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver):
        self.receiver = receiver

    def Export(self, request, context):
        if not self.receiver.export(request, "grpc"):
            context.abort(grpc.StatusCode.UNAVAILABLE, "failing by --fail-first")
        return trace_service_pb2.ExportTraceServiceResponse()


def rpc_status(code, message):
    """A serialized google.rpc.Status {code, message}: the OTLP/HTTP error body."""
    msg = message.encode("utf-8")

    def varint(n):
        out = bytearray()
        while True:
            b = n & 0x7F
            n >>= 7
            if n:
                out.append(b | 0x80)
            else:
                out.append(b)
                return bytes(out)

    return b"\x08" + varint(code) + b"\x12" + varint(len(msg)) + msg


def make_http_handler(receiver):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):
            pass

        def reply(self, status, body=b"", content_type=PROTOBUF, headers=()):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def read_body(self):
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def do_POST(self):
            # The body is read first whatever the answer, so the connection stays usable.
            try:
                body = self.read_body()
            except ValueError:
                self.close_connection = True
                return self.reply(400, b"bad request framing\n", "text/plain")
            if self.path.split("?", 1)[0] != TRACES_PATH:
                return self.reply(404, b"not found\n", "text/plain")
            content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
            if content_type != PROTOBUF:
                return self.reply(415, f"unsupported content type {content_type!r}\n".encode(), "text/plain")
            encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
            try:
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding not in ("", "identity"):
                    return self.reply(415, f"unsupported content encoding {encoding!r}\n".encode(), "text/plain")
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            except (OSError, EOFError, zlib.error, DecodeError) as e:
                return self.reply(400, rpc_status(RPC_INVALID_ARGUMENT, f"unparsable request: {e}"))
            if not receiver.export(request, "http"):
                return self.reply(503, rpc_status(RPC_UNAVAILABLE, "failing by --fail-first"),
                                  headers=(("Retry-After", "0"),))
            self.reply(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

        def not_allowed(self):
            if self.path.split("?", 1)[0] == TRACES_PATH:
                self.reply(405, b"method not allowed\n", "text/plain", headers=(("Allow", "POST"),))
            else:
                self.reply(404, b"not found\n", "text/plain")

        do_GET = do_PUT = do_DELETE = do_PATCH = not_allowed

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--out", required=True, help="file the span JSON lines are appended to")
    parser.add_argument("--fail-first", type=int, default=0, metavar="N",
                        help="fail the first N export requests (gRPC UNAVAILABLE, HTTP 503)")
    args = parser.parse_args()

    receiver = Receiver(args.out, args.fail_first)

    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(receiver), grpc_server)
    grpc_port = grpc_server.add_insecure_port(f"127.0.0.1:{args.grpc_port}")
    if grpc_port == 0:
        sys.exit(f"could not bind 127.0.0.1:{args.grpc_port} for OTLP/gRPC")
    try:
        httpd = ThreadingHTTPServer(("127.0.0.1", args.http_port), make_http_handler(receiver))
    except OSError as e:
        sys.exit(f"could not bind 127.0.0.1:{args.http_port} for OTLP/HTTP: {e}")
    http_port = httpd.server_address[1]

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())

    grpc_server.start()
    http_thread = threading.Thread(target=httpd.serve_forever, name="otlp-http", daemon=True)
    http_thread.start()
    print(f"READY grpc={grpc_port} http={http_port}", flush=True)

    while not stop.wait(0.5):
        pass
    httpd.shutdown()
    httpd.server_close()
    grpc_server.stop(grace=1).wait()
    receiver.close()


if __name__ == "__main__":
    main()
