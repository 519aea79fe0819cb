"""gRPC client for Ballast end-to-end tests.

Runs one case against grpc_server.py (directly or through the proxy) and prints
exactly one JSON line describing what was observed; exits 0 whenever it could
print that line, 2 on bad arguments. Cases:
  health          Health/Check service ""
  health-unknown  Health/Check service "nope" (expect NOT_FOUND)
  unary           Echo/Unary with b"hello"
  stream          Echo/Stream with N=100
  fail            Echo/Fail (expect PERMISSION_DENIED with trailers)
  flaky           Echo/Flaky with b"x" (UNAVAILABLE on odd-numbered server calls)
  chat            Echo/Chat: sends m0, m1, m2, each only after the previous answer
--authority sets :authority via the channel option grpc.default_authority.
"""
import argparse
import json
import queue

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT = 10.0
CASES = ("health", "health-unknown", "unary", "stream", "fail", "flaky", "chat")


def md(metadata):
    """Metadata tuple -> dict (binary values decoded leniently)."""
    out = {}
    for key, value in metadata or ():
        out[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return out


def run(channel, case):
    if case in ("health", "health-unknown"):
        stub = health_pb2_grpc.HealthStub(channel)
        service = "" if case == "health" else "nope"
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        return {"code": "OK", "status": health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}
    if case == "unary":
        resp, call = channel.unary_unary("/ballast.test.Echo/Unary").with_call(b"hello", timeout=TIMEOUT)
        return {"code": call.code().name, "response": resp.decode("utf-8", "replace"),
                "trailing_metadata": md(call.trailing_metadata())}
    if case == "stream":
        call = channel.unary_stream("/ballast.test.Echo/Stream")(b"100", timeout=TIMEOUT)
        msgs = [m.decode("utf-8", "replace") for m in call]
        return {"code": call.code().name, "count": len(msgs),
                "first": msgs[0] if msgs else None, "last": msgs[-1] if msgs else None,
                "trailing_metadata": md(call.trailing_metadata())}
    if case == "chat":
        outbox = queue.Queue()

        def messages():
            while True:
                item = outbox.get()
                if item is None:
                    return
                yield item

        call = channel.stream_stream("/ballast.test.Echo/Chat")(messages(), timeout=TIMEOUT)
        replies = []
        for i in range(3):
            outbox.put(b"m%d" % i)
            replies.append(next(call).decode("utf-8", "replace"))
        outbox.put(None)
        list(call)
        return {"code": call.code().name, "replies": replies}
    if case == "flaky":
        resp, call = channel.unary_unary("/ballast.test.Echo/Flaky").with_call(b"x", timeout=TIMEOUT)
        return {"code": call.code().name, "response": resp.decode("utf-8", "replace")}
    # fail: success would be unexpected, but report it all the same.
    resp, call = channel.unary_unary("/ballast.test.Echo/Fail").with_call(b"", timeout=TIMEOUT)
    return {"code": call.code().name, "response": resp.decode("utf-8", "replace")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="HOST:PORT to connect to")
    parser.add_argument("--case", required=True, choices=CASES)
    parser.add_argument("--authority", help="value for :authority")
    args = parser.parse_args()

    options = [("grpc.default_authority", args.authority)] if args.authority else []
    result = {"case": args.case}
    try:
        with grpc.insecure_channel(args.target, options=options) as channel:
            result.update(run(channel, args.case))
    except grpc.RpcError as err:  # the error is also the Call: it carries status and metadata
        result.update({"code": err.code().name, "details": err.details(),
                       "initial_metadata": md(err.initial_metadata()),
                       "trailing_metadata": md(err.trailing_metadata())})
    except Exception as err:  # still one JSON line, so the Rust test sees what went wrong
        result.update({"code": "CLIENT_ERROR", "details": f"{type(err).__name__}: {err}"})
    print(json.dumps(result, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
