"""A TCP proxy that holds each chunk a client sends for a while before passing it on.

Usage: python3 bench/latency_proxy.py LISTEN_PORT TARGET_PORT DELAY_MS

Stands in for a bucket's latency in front of a loopback S3 server (moto), so that a
measurement of request counts and concurrency (BENCHMARKS.md, ingest) shows what a real
store's round trips cost. Replies pass without delay; each request pays DELAY_MS once.
"""

import asyncio
import sys


async def pipe(reader, writer, delay):
    try:
        while data := await reader.read(65536):
            if delay:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(listen_port, target_port, delay):
    async def handle(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(
            pipe(client_reader, server_writer, delay),
            pipe(server_reader, client_writer, 0),
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    listen, target, delay_ms = sys.argv[1:4]
    asyncio.run(main(int(listen), int(target), float(delay_ms) / 1000))
