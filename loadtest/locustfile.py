"""Locust load test of cbam-serve over gRPC.

    locust -f loadtest/locustfile.py --host 127.0.0.1:50051 --headless -u 16 -r 4 -t 1m \\
        --csv out/locust --html out/locust.html --cbam-attention-share 0.1 --cbam-stream-share 0.2

See docs/LOADTEST.md for the settings, distributed mode and the reports.
"""

from locust import constant

from client.locust_user import CbamGrpcUser


class CbamUser(CbamGrpcUser):
    """One caller that sends its next request as soon as the last one is answered."""

    wait_time = constant(0)
