"""WebSocket client for Ballast end-to-end tests.

Opens a TCP connection to --connect and runs the WebSocket handshake for --url
over it, so the Host header is the URL's host while the bytes go to --connect
(e.g. a proxy that routes on Host). Expects ws_echo_server.py behind it:
reads the "path:" greeting, sends 20 text and 5 binary messages (one of 1 MiB),
checks every echo, closes cleanly. Prints one JSON line,
{"ok":true,"path":...,"text_echoed":20,"binary_echoed":5,"server_header":...}
or {"ok":false,"error":...}; exits 0 either way, 2 on bad arguments.
"""
import argparse
import asyncio
import json
import os
import socket
from urllib.parse import urlsplit

from websockets.asyncio.client import connect

TIMEOUT = 10.0
MAX_SIZE = 16 * 1024 * 1024


async def exchange(sock, url):
    result = {"path": None, "text_echoed": 0, "binary_echoed": 0, "server_header": None}
    async with connect(url, sock=sock, max_size=MAX_SIZE, open_timeout=TIMEOUT) as ws:
        result["server_header"] = ws.response.headers.get("x-ws-server")
        greeting = await ws.recv()
        if not isinstance(greeting, str) or not greeting.startswith("path:"):
            raise ValueError(f"bad greeting {greeting!r:.100}")
        result["path"] = greeting[len("path:"):]

        texts = [f"text-{i} héllo" for i in range(20)]
        blobs = [os.urandom(n) for n in (1, 100, 4096, 65536, 1024 * 1024)]
        for kind, messages in (("text", texts), ("binary", blobs)):
            echoed = 0
            for message in messages:
                await ws.send(message)
                reply = await ws.recv()
                if reply != message:
                    raise ValueError(f"{kind} echo #{echoed} differs ({len(reply)} vs {len(message)})")
                echoed += 1
            result[f"{kind}_echoed"] = echoed
        await ws.close()
        if ws.close_code != 1000:
            raise ValueError(f"unclean close: code={ws.close_code} reason={ws.close_reason!r}")
    return result


async def main(args):
    host, _, port = args.connect.rpartition(":")
    loop = asyncio.get_running_loop()
    # Non-blocking connect, so the overall timeout also covers it.
    family, kind, proto, _, addr = (await loop.getaddrinfo(
        host.strip("[]"), int(port), type=socket.SOCK_STREAM))[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, addr)
        return await exchange(sock, args.url)
    finally:
        sock.close()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connect", required=True, help="HOST:PORT to open the TCP connection to")
    parser.add_argument("--url", required=True, help="ws://NAME[:PORT]/PATH")
    args = parser.parse_args()
    host, _, port = args.connect.rpartition(":")
    if not host or not port.isdigit():
        parser.error("--connect must be HOST:PORT")
    if urlsplit(args.url).scheme != "ws" or not urlsplit(args.url).hostname:
        parser.error("--url must be ws://NAME[:PORT]/PATH")
    return args


if __name__ == "__main__":
    args = parse_args()
    try:
        out = {"ok": True, **asyncio.run(asyncio.wait_for(main(args), TIMEOUT))}
    except TimeoutError:
        out = {"ok": False, "error": f"timed out after {TIMEOUT:g} s"}
    except Exception as err:
        out = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    print(json.dumps(out, separators=(",", ":")), flush=True)
