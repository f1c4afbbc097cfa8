"""Test helper run inside a lab node's namespace: get a workload certificate
from the lab CA with that node's token, as a node agent would, and print it
as JSON (key, chain). Used to give independent peers (Node, nghttpx) real
mesh certificates."""

import asyncio
import json
import sys

from agent.identity import pki
from agent.identity.client import CaClient


async def main(address, root_path, token_path, uri):
    client = CaClient(address, open(root_path, "rb").read(), lambda: open(token_path).read().strip())
    key = pki.generate_key()
    chain = await client.create_certificate(pki.build_csr(key, uri), 3600, uri)
    await client.close()
    print(json.dumps({"key": pki.private_key_pem(key).decode(), "chain": chain}))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
