"""The ``hutchpp`` backend (Hutch++ trace on PyHessian's HVPs) — being built."""
