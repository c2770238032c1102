"""Embedding the VSP side in an emulator that has its own guest memory and
its own message port (here: the in-process LocalPort, and the library's
guest driver standing in for the emulated guest).

The server needs only two things from the emulator:
  * guest memory as a memfd (GuestMemory.create, or GuestMemory.from_fd of
    the emulator's own memfd), so ring pages can be mapped with a mirror;
  * a MessagePort: post(payload, fds), receive(timeout), fileno(), close().
"""

from vmbus.guest import Guest
from vmbus.memory import GuestMemory
from vmbus.partition import Host
from vmbus.protocols.echo import ECHO_CLASS_ID
from vmbus.transport import LocalPort
from vsc.echo import EchoVsc
from vsp.echo import EchoVsp


def main() -> None:
    memory = GuestMemory.create(8 << 20, name="emulated-guest")
    host_port, guest_port = LocalPort.pair()
    with Host() as host:
        partition = host.attach(memory, host_port, devices=[EchoVsp()], name="emulated")

        # The emulator's guest side: any implementation of the wire protocol.
        guest = Guest(guest_port, memory)
        drivers: list[EchoVsc] = []
        guest.register(ECHO_CLASS_ID, lambda device: drivers.append(EchoVsc(device)))
        version = guest.connect()
        reply = drivers[0].echo(b"from the emulated guest")
        print(
            f"negotiated VMBus {version >> 16}.{version & 0xFFFF}; echo: {reply.rstrip(bytes(1))!r}"
        )
        assert drivers[0].channel is not None
        drivers[0].channel.close()
        guest.unload()
        print("partition state:", partition.state)
        partition.stop()
        print("stopped:", partition.state)
        guest.close()


if __name__ == "__main__":
    main()
