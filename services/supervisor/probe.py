"""`infermesh probe`: one health check, for container HEALTHCHECKs and scripts.

Exits 0 when the service is healthy, 1 otherwise, with one line saying why.
Without options it checks gRPC health on 127.0.0.1 at $INFERMESH_PORT (the
port the service in the same container was given), so one image-wide
HEALTHCHECK serves every service.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from grpc_health.v1 import health_pb2
from infermesh.supervisor.readiness import grpc_status, http_status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infermesh probe", description=__doc__.splitlines()[0])
    parser.add_argument("--grpc", metavar="HOST:PORT",
                        help="gRPC health of this address (default 127.0.0.1:$INFERMESH_PORT).")
    parser.add_argument("--http", metavar="URL", help="Expect HTTP 200 from this URL instead.")
    parser.add_argument("--service", default="", help="gRPC health service name (default: the server).")
    parser.add_argument("--timeout", type=float, default=3.0, help="Seconds to wait for the answer.")
    args = parser.parse_args(argv)
    if args.http:
        status = http_status(args.http, timeout=args.timeout)
        if status == 200:
            return 0
        print(f"unhealthy: {args.http} answered {status or 'nothing'}", file=sys.stderr)
        return 1
    address = args.grpc or f"127.0.0.1:{os.environ.get('INFERMESH_PORT', '') or '50051'}"
    code = grpc_status(address, args.service, timeout=args.timeout)
    if code == health_pb2.HealthCheckResponse.SERVING:
        return 0
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(code) if code is not None else "no answer"
    print(f"unhealthy: gRPC health of {address}: {name}", file=sys.stderr)
    return 1
