"""Random ids for connections and guest names, from the OS's CSPRNG in blocks.

`secrets.token_hex` makes a `getrandom` system call per id, two per WebSocket handshake (the
connection's id, a guest's name): a block of 4 KiB serves about 500 handshakes with one. A forked
child (a gunicorn worker) empties the block it inherited, so no two processes hand out the same ids.
"""

from __future__ import annotations

import os

BLOCK_BYTES = 4096

_block = b""
_used = 0


def random_hex(nbytes: int) -> str:
    """`nbytes` random bytes as hex, like `secrets.token_hex(nbytes)`."""
    global _block, _used
    start = _used
    if start + nbytes > len(_block):
        _block, start = os.urandom(max(BLOCK_BYTES, nbytes)), 0
    _used = start + nbytes
    return _block[start:_used].hex()


def _forget_block() -> None:
    global _block, _used
    _block, _used = b"", 0


os.register_at_fork(after_in_child=_forget_block)
