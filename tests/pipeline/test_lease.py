"""A lease outlives a store that fails for a while: its holder keeps renewing it rather than letting it lapse while it
still works (a training run whose lock lapsed could be taken over by a second command). On S3 and locally."""

from __future__ import annotations

import json
import time

import pytest
from botocore.exceptions import EndpointConnectionError

from pipeline.lease import Lease
from pipeline.storage import Storage

pytestmark = pytest.mark.integration


class FailingRenewals(Storage):
    """The real store, except that its first `failures` conditional replaces fail as an unreachable store does."""

    def __init__(self, storage: Storage, failures: int):
        super().__init__(storage.endpoint_url)
        self.failures, self.failed = failures, 0

    def put_bytes(self, location, data, if_absent=False, if_match=None):
        if if_match is not None and self.failed < self.failures:
            self.failed += 1
            if location.scheme == "s3":
                raise EndpointConnectionError(endpoint_url=self.endpoint_url)
            raise OSError("the store is unavailable")
        return super().put_bytes(location, data, if_absent=if_absent, if_match=if_match)


def test_a_renewal_that_fails_for_a_while_is_tried_again_and_the_lease_stays_held(storage_folder):
    storage, folder = storage_folder
    flaky = FailingRenewals(storage, failures=3)
    location = folder.join("run.lock")
    with Lease(flaky, location, ttl_s=1.0, renew_every_s=0.1) as lease:
        first = json.loads(storage.read_bytes(location))["expires_at"]
        while time.time() < first + 0.5:  # past the expiry of the lease as first written
            time.sleep(0.05)
        assert flaky.failed == 3  # the renewals really failed
        lease.ensure_held()
        assert json.loads(storage.read_bytes(location))["expires_at"] > first
