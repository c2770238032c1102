"""The synthetic keyboard and HID mouse VSPs: `KeyboardVsp` and `MouseVsp`
offer one channel each and take injected input from any thread (`press`,
`key`, `move`, `pointer`); each open channel is served by a
`KeyboardHandler` / `MouseHandler`."""

from vsp.input.device import InputHandler, KeyboardHandler, KeyboardVsp, MouseHandler, MouseVsp

__all__ = ["InputHandler", "KeyboardHandler", "KeyboardVsp", "MouseHandler", "MouseVsp"]
