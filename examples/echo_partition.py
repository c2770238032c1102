"""A parent process hosts one child partition with an echo device."""

from vmbus.partition import Host
from vmbus.protocols.echo import ECHO_CLASS_ID
from vsc.echo import EchoVsc
from vsp.echo import EchoVsp


def child(guest):  # type: ignore[no-untyped-def]  # runs in the child process
    drivers = []
    guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
    reply = drivers[0].echo(b"hello")
    assert reply.startswith(b"hello"), reply
    print("child: echo came back")


if __name__ == "__main__":
    with Host() as host:  # the parent: the root partition
        partition = host.start(child, devices=[EchoVsp()], memory_size=8 << 20)
        print("parent: child exit code", partition.wait(timeout=30))
