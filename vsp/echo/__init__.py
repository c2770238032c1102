"""The echo VSP: the template for a new device's back end."""

from vsp.echo.device import EchoHandler, EchoVsp

__all__ = ["EchoHandler", "EchoVsp"]
