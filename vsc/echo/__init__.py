"""The echo VSC: the template for a new device's front end."""

from vsc.echo.device import EchoVsc

__all__ = ["EchoVsc"]
