"""A stand-in peer for the tests of `cbam-bench --peers`: a real gRPC server on loopback answering one unary
method, /fake.Peer/Top1, with a fixed top-1 answer as JSON; with --fail-after N, every call after the
first N is answered UNAVAILABLE (an HTTP 200 without a message, which h2load counts as a success).

    python tests/loadtest/fake_peer.py --index 3 --probability 0.5 [--fail-after N]

Prints its port on stdout, then serves until SIGTERM.
"""

import argparse
import itertools
import json
import signal
from concurrent import futures

import grpc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--probability", type=float, required=True)
    parser.add_argument("--fail-after", type=int)
    args = parser.parse_args()
    answer = json.dumps({"index": args.index, "probability": args.probability}).encode()
    calls = itertools.count()

    def top1(request: bytes, context: grpc.ServicerContext) -> bytes:
        if args.fail_after is not None and next(calls) >= args.fail_after:
            context.abort(grpc.StatusCode.UNAVAILABLE, "failing on purpose")
        return answer

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.method_handlers_generic_handler(
        "fake.Peer", {"Top1": grpc.unary_unary_rpc_method_handler(top1)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    print(port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
