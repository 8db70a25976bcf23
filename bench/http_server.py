#!/usr/bin/env python3
"""A static HTTP/1.1 server (keep-alive, TCP_NODELAY) for casync's chunk store.

    http_server.py ADDR PORT DIR

Without TCP_NODELAY, Nagle's algorithm and the client's delayed ACK add 40 ms to every chunk
request (headers and body are two writes), which would make casync look far slower than it is.
"""
import http.server
import os
import sys


class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass


def main():
    addr, port, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    os.chdir(root)
    http.server.ThreadingHTTPServer((addr, port), Handler).serve_forever()


if __name__ == "__main__":
    main()
