# What vsc.storage's other compiled module (_lone.pyx) takes from _fast.pyx.

cdef int copy_buffers(object dst, object src, Py_ssize_t n) except -1
