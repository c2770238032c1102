# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled pixel shuffle of the VNC encoders (`vsp.video.encodings`).

`pack_pixels(src, dst, order)` writes each pixel of `src` ((h, w, 4) BGRX,
any strides) as len(order) bytes into `dst` (contiguous, row-major): output
byte k is source byte order[k], or 0xFF where order[k] is 3 (the padding
byte clients read as alpha). It is numpy's `Encoder._pack_numpy` in one
pass without the GIL; tests/video/test_video_fast.py holds the two to
byte-identical output.
"""

from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy


def pack_pixels(const uint8_t[:, :, :] src, uint8_t[::1] dst, bytes order):
    cdef Py_ssize_t h = src.shape[0], w = src.shape[1], n = len(order), y, x, k
    cdef Py_ssize_t sy = src.strides[0], sx = src.strides[1], sc = src.strides[2]
    cdef int o[4]
    if src.shape[2] != 4 or not 1 <= n <= 4:
        raise ValueError("pack_pixels takes (h, w, 4) pixels and 1 to 4 output bytes")
    if dst.shape[0] < h * w * n:
        raise ValueError(f"{dst.shape[0]} bytes cannot hold {h}x{w} pixels of {n}")
    for k in range(n):
        o[k] = order[k]
        if not 0 <= o[k] <= 3:
            raise ValueError(f"order byte {o[k]}")
    if h == 0 or w == 0:
        return
    cdef const uint8_t* base = &src[0, 0, 0]
    cdef const uint8_t* p
    cdef uint8_t* d = &dst[0]
    cdef uint32_t v
    cdef int s0 = 8 * o[0], s1 = 8 * o[1 % n], s2 = 8 * o[2 % n], s3 = 8 * o[3 % n]
    if sc == 1 and n >= 3:  # whole pixels: one load, the padding byte set, shifts
        with nogil:
            for y in range(h):
                p = base + y * sy
                for x in range(w):
                    memcpy(&v, p, 4)
                    v |= 0xFF000000u
                    d[0] = <uint8_t>(v >> s0)
                    d[1] = <uint8_t>(v >> s1)
                    d[2] = <uint8_t>(v >> s2)
                    if n == 4:
                        d[3] = <uint8_t>(v >> s3)
                    d += n
                    p += sx
        return
    with nogil:
        for y in range(h):
            p = base + y * sy
            for x in range(w):
                for k in range(n):
                    d[k] = 0xFF if o[k] == 3 else p[o[k] * sc]
                d += n
                p += sx
