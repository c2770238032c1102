"""The synthetic keyboard and mouse for child programs: `Keyboard` and
`Mouse` bind to a `GuestDevice` and give its events by `poll`,
`next_event`, or asyncio (`events`)."""

from vsc.input.device import Keyboard, Mouse, events

__all__ = ["Keyboard", "Mouse", "events"]
