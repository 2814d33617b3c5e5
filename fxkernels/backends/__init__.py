"""Kernel backends. Each module registers its kernels with :func:`fxkernels.dispatch.register`
when imported and reports its own availability with ``set_backend_status``; an ImportError here
simply marks the backend unavailable."""
