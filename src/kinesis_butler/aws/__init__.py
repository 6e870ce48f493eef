"""The lean AWS JSON client: SigV4 signer, aiohttp transport, typed Kinesis operations."""
