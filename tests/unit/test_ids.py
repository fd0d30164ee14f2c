"""wsapp.ids: random ids served from a block of OS randomness, never repeated by a forked worker."""

from __future__ import annotations

import os

from wsapp.ids import BLOCK_BYTES, random_hex


def test_ids_are_hex_of_the_asked_length_and_distinct_across_blocks() -> None:
    ids = [random_hex(6) for _ in range(3 * BLOCK_BYTES // 6)]  # three blocks' worth
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    assert len(random_hex(2)) == 4 and len(random_hex(BLOCK_BYTES + 1)) == 2 * (BLOCK_BYTES + 1)


def test_a_forked_child_does_not_hand_out_its_parents_next_ids() -> None:
    random_hex(6)  # the parent holds a block with ids left in it
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child, as a gunicorn worker forked from the arbiter
        os.write(write_end, "".join(random_hex(6) for _ in range(4)).encode())
        os._exit(0)
    os.close(write_end)
    parents = "".join(random_hex(6) for _ in range(4))
    with os.fdopen(read_end, "rb") as pipe:
        childs = pipe.read().decode()
    os.waitpid(pid, 0)
    assert len(childs) == 48
    assert childs != parents
