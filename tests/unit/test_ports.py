"""Free ports for test and bench meshes: never from the range the kernel gives outgoing connections."""

import socket

from tools import ports


def test_ports_are_below_the_ephemeral_range_distinct_and_bindable():
    low, _ = ports._ephemeral_range()
    picked = [ports.free_port() for _ in range(200)]
    assert len(set(picked)) == len(picked)
    assert all(ports._LOWEST_PORT <= port < low for port in picked)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", picked[-1]))


def test_a_block_is_consecutive_free_and_never_handed_out_again():
    first = ports.free_port_block(5)
    block = set(range(first, first + 5))
    later = {ports.free_port() for _ in range(300)}
    assert not block & later
    for port in block:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
