"""Adapters from the cloud: a reference adapter service and an offline-first device client.

    edgelora cloud serve --root service/ --base smollm2-135m      # the service (FastAPI, uvicorn)
    client = edgelora.CloudClient.for_bundle(bundle)             # the device
    client.pull(client.request(description="...", name="x")["id"])

The service signs each adapter's manifest with Ed25519; the device pins the public key and
installs nothing that does not verify. See `service`, `client`, `signing` and `compose`.
"""

from .client import AuthError, CloudClient, CloudError, ServiceUnreachableError, TamperedError
from .signing import SignatureError

__all__ = ["AuthError", "CloudClient", "CloudError", "ServiceUnreachableError", "SignatureError", "TamperedError"]
