"""WebSocket echo peer for Ballast end-to-end tests.

On connect, sends the text "path:<request path>" first, then echoes every text
or binary message back unchanged. The handshake response carries the header
"x-ws-server: ballast-test". Prints "READY <port>" once listening (--port 0
picks a free port); exits cleanly on SIGTERM/SIGINT.
"""
import argparse
import asyncio
import signal

from websockets.asyncio.server import serve

MAX_SIZE = 16 * 1024 * 1024


async def echo(ws):
    await ws.send(f"path:{ws.request.path}")
    async for message in ws:
        await ws.send(message)


def add_header(connection, request, response):
    response.headers["x-ws-server"] = "ballast-test"


async def main(host, port):
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with serve(echo, host, port, process_response=add_header, max_size=MAX_SIZE) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"READY {bound}", flush=True)
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port))
