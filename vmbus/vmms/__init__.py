"""The management service (Hyper-V's VMMS): VM definitions (`config`), the
service's state (`service`), its REST API on a unix socket (`api`), a client
(`client`) and the command line (`ctl`: `vmbus serve`, `vmbus ctl`), and the
default guest program (`agent`). An application: it sits on top of the
devices (vsp, vsc) and the bus."""

__all__: list[str] = []
