"""gRPC peer for Ballast end-to-end tests.

Serves the standard health service ("" and "ballast.test.Echo" SERVING) and a
codegen-free echo service with raw-bytes methods:
  /ballast.test.Echo/Unary   unary-unary: b"echo:" + request, trailer x-trailer=unary
  /ballast.test.Echo/Stream  unary-stream: request is ASCII N (<= 10000);
                             yields b"msg-0".. b"msg-{N-1}", trailer x-trailer=stream
  /ballast.test.Echo/Fail    sends initial metadata x-initial=sent, then fails
                             PERMISSION_DENIED "denied by test", trailer x-reason=test
  /ballast.test.Echo/Flaky   odd-numbered calls (1st, 3rd, ...) fail UNAVAILABLE before
                             any header (trailers-only); even ones answer b"call:N"
  /ballast.test.Echo/Chat    stream-stream: answers each message b"re:" + message as it
                             arrives (the client waits for each answer before sending on)
Prints "READY <port>" once serving (--port 0 picks a free port); exits on SIGTERM/SIGINT.
"""
import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "ballast.test.Echo"


def unary(request, context):
    context.set_trailing_metadata((("x-trailer", "unary"),))
    return b"echo:" + request


def stream(request, context):
    try:
        n = min(int(request.decode("ascii")), 10000)
    except ValueError:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request must be an ASCII integer")
    for i in range(n):
        yield b"msg-%d" % i
    context.set_trailing_metadata((("x-trailer", "stream"),))


def fail(request, context):
    # Headers first, so the status travels in real trailers (not trailers-only).
    context.send_initial_metadata((("x-initial", "sent"),))
    context.set_trailing_metadata((("x-reason", "test"),))
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "denied by test")


def chat(request_iterator, context):
    for message in request_iterator:
        yield b"re:" + message


FLAKY_CALLS = [0]
FLAKY_LOCK = threading.Lock()


def flaky(request, context):
    with FLAKY_LOCK:
        FLAKY_CALLS[0] += 1
        n = FLAKY_CALLS[0]
    if n % 2 == 1:
        context.abort(grpc.StatusCode.UNAVAILABLE, "flaky by test")
    return b"call:%d" % n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # No serializers given: requests and responses are raw bytes.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Flaky": grpc.unary_unary_rpc_method_handler(flaky),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    }),))
    host = f"[{args.host}]" if ":" in args.host else args.host
    port = server.add_insecure_port(f"{host}:{args.port}")
    if port == 0:
        sys.exit(f"could not bind {host}:{args.port}")
    server.start()

    def on_signal(signum, frame):
        server.stop(grace=1)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"READY {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
